"""Every hook of srde_core.hookspecs, called in the documented order with the documented arguments,
seen through tests/recording_plugin.py on the micro recipe; plugin state through checkpoints and a
``[plugins.recorder]`` settings table end to end.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from srde_core import hookspecs
from srde_core.errors import RecipeError
from srde_core.plugins import load_plugins
from srde_core.recipe import load_recipe

from conftest import RECIPES, run_recipe_in
from recording_plugin import NAME, Recorder

BASE_STEPS, EXPERT_STEPS, CHECKPOINT_EVERY = 6, 6, 2  # as in tests/recipes/micro.toml
TAG = "hello-hooks"


def hook_names() -> set[str]:
    return {name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("srde_")}


def write_recipe(directory: Path) -> Path:
    path = directory / "recorded.toml"
    path.write_text(
        f'extends = "{(RECIPES / "micro.toml").as_posix()}"\n'
        'name = "recorded"\n\n'
        f'[plugins.{NAME}]\ntag = "{TAG}"\n'
    )
    return path


def run_with(recorder: Recorder, workdir: Path, overrides=(), **kwargs):
    plugins = load_plugins(extra=[(NAME, recorder)])
    return run_recipe_in(workdir, write_recipe(workdir), plugins, list(overrides), **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A complete micro run (base pre-training, then experts) with a recorder."""
    workdir = tmp_path_factory.mktemp("hooks")
    recorder = Recorder()
    run = run_with(recorder, workdir, ["phases.base.log_every=1", "phases.experts.log_every=1"])
    return recorder, run, workdir / run.run_dir


@pytest.fixture(scope="module")
def resumed(full):
    """The same recipe under another name, interrupted after experts step 3 (checkpoint at step 2),
    then resumed in a fresh plugin instance, as a new process would be. The base comes from the cache."""
    _, _, run_dir = full
    workdir = run_dir.parents[1]
    first = Recorder()
    first.interrupt_at = ("experts", 3)
    overrides = ["name=interrupted", "phases.base.log_every=1", "phases.experts.log_every=1"]
    with pytest.raises(KeyboardInterrupt):
        run_with(first, workdir, overrides)
    second = Recorder()
    run = run_with(second, workdir, overrides, resume=True)
    return first, second, workdir / run.run_dir


def expected_sequence() -> list[str]:
    sequence = [
        "srde_add_kinds", "srde_register",  # load_plugins
        "srde_run_header", "srde_model_load_kwargs",  # the recipe check before any work (srde validate's)
        "srde_run_header", "srde_prepare_data", "srde_model_load_kwargs",
        "srde_model_init_context", "model_init_context.enter", "model_init_context.exit",
        "srde_before_phase",
    ]
    sequence += ["srde_after_step"] * BASE_STEPS + ["srde_checkpoint_saving", "srde_after_phase"]
    sequence += ["srde_before_phase", "srde_configure_model"]
    for step in range(1, EXPERT_STEPS + 1):
        sequence += ["srde_forward_context", "srde_after_step"]
        if step % CHECKPOINT_EVERY == 0:
            sequence.append("srde_checkpoint_saving")
    return [*sequence, "srde_after_phase", "srde_after_run"]


def test_hooks_are_called_in_the_documented_order(full):
    recorder, _, _ = full
    assert recorder.names() == expected_sequence()


def test_start_up_hooks_get_this_plugins_registrar(full):
    recorder, _, _ = full
    assert recorder.of("srde_add_kinds") == [{"provider": NAME}]
    assert recorder.of("srde_register") == [{"provider": NAME}]


def test_run_set_up_hooks_see_the_recipe_the_data_and_no_model_yet(full):
    recorder, run, _ = full
    # twice: the recipe check before any work, then the header (a pure function of the recipe)
    assert recorder.of("srde_run_header") == [{"recipe": "recorded", "tag": TAG}] * 2
    assert f"recorder: tag {TAG}" in run.console.file.getvalue()
    (data,) = recorder.of("srde_prepare_data")
    assert data == {"train": 6 * 40, "eval": 6 * 6, "domains": sorted(data["domains"]), "model_is_none": True}
    assert len(data["domains"]) == 6
    assert recorder.of("srde_model_load_kwargs") == [{"recipe": "recorded"}] * 2
    assert recorder.of("srde_model_init_context") == [{"model_is_none": True, "data_loaded": True}]
    assert recorder.of("model_init_context.enter") == [{"model_is_none": True}]


def test_configure_model_is_called_once_with_the_experts_attached_and_the_base_frozen(full):
    recorder, run, _ = full
    (call,) = recorder.of("srde_configure_model")
    assert call == {"srde_layers": 2, "trainable": call["trainable"], "only_experts_train": True, "same_model": True}
    assert call["trainable"] > 0
    # ... at the start of the first phase that trains experts, before its first forward
    names = recorder.names()
    assert names.index("srde_configure_model") == names.index("srde_forward_context") - 1
    assert [c["phase"] for c in recorder.of("srde_before_phase")] == ["base", "experts"]


def test_before_and_after_phase_arguments(full):
    recorder, _, _ = full
    assert recorder.of("srde_before_phase") == [{"phase": "base", "tag": TAG}, {"phase": "experts", "tag": TAG}]
    assert recorder.of("srde_after_phase") == [
        {"phase": "base", "step": BASE_STEPS, "metrics_phase": "base"},
        {"phase": "experts", "step": EXPERT_STEPS, "metrics_phase": "experts"},
    ]


def test_after_step_gets_one_based_steps_and_the_step_metrics(full):
    recorder, _, run_dir = full
    calls = recorder.of("srde_after_step")
    assert [(c["phase"], c["step"]) for c in calls] == [("base", s) for s in range(1, BASE_STEPS + 1)] + [
        ("experts", s) for s in range(1, EXPERT_STEPS + 1)
    ]
    common = {"phase", "step", "loss", "lm", "lr", "grad_norm", "tokens_per_s", "recorder_steps"}
    for call in calls:
        keys = set(call["keys"])
        assert common <= keys and "tokens" not in keys, call
        routed = {"load_balance", "router_max_load", "router_entropy"}
        assert routed <= keys if call["phase"] == "experts" else not routed & keys, call
    # what a plugin adds to the metrics is logged
    assert [r["recorder_steps"] for r in metrics(run_dir) if "step" in r] == list(range(1, BASE_STEPS + EXPERT_STEPS + 1))


def test_forward_context_is_called_before_every_expert_forward_with_the_batch(full):
    recorder, _, _ = full
    calls = recorder.of("srde_forward_context")
    assert len(calls) == EXPERT_STEPS  # grad_accum 1; none while the base trains densely
    for call in calls:
        assert call["phase"] == "experts" and call["batch_size"] == 8
        assert {"input_ids", "attention_mask", "labels", "domain_ids"} <= set(call["batch_keys"])
        assert len(call["domain_ids"]) == 8 and set(call["domain_ids"]) <= set(range(6))
        assert call["routings_before_forward"] == 0


def test_after_run_is_called_once_the_adapter_is_written(full, resumed):
    assert full[0].of("srde_after_run") == [{"adapter_written": True, "base_written": True}]
    first, second, _ = resumed
    assert first.of("srde_after_run") == []  # the interrupted run never finished
    assert second.of("srde_after_run") == [{"adapter_written": True, "base_written": True}]
    assert second.names()[-1] == "srde_after_run"


def test_checkpoint_saving_puts_plugin_state_into_every_checkpoint(full):
    recorder, _, run_dir = full
    saves = recorder.of("srde_checkpoint_saving")
    assert [(s["phase"], s["step"]) for s in saves] == [("base", 6), ("experts", 2), ("experts", 4), ("experts", 6)]
    assert all({"metrics", "state", "plugins"} <= set(s["keys"]) for s in saves)
    stored = torch.load(run_dir / "checkpoints" / "experts-step0000006" / "trainer.pt", weights_only=False)
    assert stored["plugins"][NAME] == recorder.saved[-1]
    assert stored["plugins"][NAME]["tag"] == TAG
    assert len(stored["plugins"][NAME]["steps_seen"]) == BASE_STEPS + EXPERT_STEPS


def test_settings_table_is_validated_resolved_and_recorded(full, tmp_path):
    _, _, run_dir = full
    saved = json.loads((run_dir / "recipe.json").read_text())
    assert saved["recipe"]["plugins"][NAME] == {"tag": TAG, "header": True}
    plugins = load_plugins(extra=[(NAME, Recorder())])
    recipe = write_recipe(tmp_path)
    assert load_recipe(recipe, plugins, []).settings(NAME).tag == TAG
    with pytest.raises(RecipeError, match=rf"plugins\.{NAME}\.colour"):
        load_recipe(recipe, plugins, [f"plugins.{NAME}.colour=1"])
    with pytest.raises(RecipeError, match=rf"plugins\.{NAME}"):
        load_recipe(recipe, load_plugins(), [])  # the table is unknown without the plugin


def test_interrupted_run_stops_inside_the_step_it_was_interrupted_in(resumed):
    first, _, _ = resumed
    assert first.names()[-1] == "srde_after_step" and first.of("srde_after_step")[-1]["step"] == 3
    # the base came from the cache: no base steps, no base checkpoint
    assert [(c["phase"], c["step"]) for c in first.of("srde_after_step")] == [("experts", s) for s in (1, 2, 3)]
    assert [(s["phase"], s["step"]) for s in first.of("srde_checkpoint_saving")] == [("experts", 2)]


def test_checkpoint_loaded_hands_back_the_saved_plugin_state_on_resume(resumed):
    first, second, run_dir = resumed
    assert second.of("srde_checkpoint_loaded") == [{"step": 2, "phase": "experts"}]
    assert second.restored == [first.saved[0]]
    names = second.names()
    loaded = names.index("srde_checkpoint_loaded")
    assert names.index("srde_configure_model") < loaded < names.index("srde_forward_context")
    assert [c["step"] for c in second.of("srde_after_step")] == [3, 4, 5, 6]
    # the restored counter continues where the checkpoint left it, in the logged metrics
    assert [r["recorder_steps"] for r in metrics(run_dir) if r.get("phase") == "experts"] == [1, 2, 3, 4, 5, 6]


def test_every_hookspec_is_implemented_and_seen_called(full, resumed):
    """Meta-test: a hook added to srde_core.hookspecs needs a recorder method and a call in a run."""
    specs = hook_names()
    assert len(specs) >= 13
    assert specs <= {name for name in dir(Recorder) if name.startswith("srde_")}
    recorded = set(full[0].names()) | set(resumed[0].names()) | set(resumed[1].names())
    assert specs - recorded == COMMAND_LINE_HOOKS, "hookspecs never called in a run"


COMMAND_LINE_HOOKS = {"srde_add_commands"}  # called by the command line, not by a run


def test_add_commands_gives_the_command_line_a_plugins_command(capsys):
    from srde_core.cli import build_parser

    recorder = Recorder()
    parser = build_parser(load_plugins(extra=[(NAME, recorder)]))
    assert recorder.of("srde_add_commands") == [{}]
    args = parser.parse_args(["recorded", "--tag", TAG])
    assert args.func(args) == 0 and capsys.readouterr().out == f"recorded {TAG}\n"
    with pytest.raises(SystemExit) as mistake:  # the plugin's parser makes one-line mistakes, exit 2
        parser.parse_args(["recorded", "--bogus"])
    assert mistake.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
