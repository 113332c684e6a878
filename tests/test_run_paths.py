"""Run paths the micro end-to-end tests do not take: --fresh, resume without a run, reopening a run
that cannot be reopened, checkpoint format versions, bf16 autocast on CPU, no gradient clipping, a
base model loaded from a local directory, an un-cached base, and a model path that does not exist.

One working directory serves the module (the corpus and tokenisation caches are built once).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from srde_core.cli import main
from srde_core.hookspecs import hookimpl
from srde_core.plugins import load_plugins
from srde_core.train.checkpoints import FORMAT_VERSION

from conftest import RECIPES, run_recipe_in

MICRO = (RECIPES / "micro.toml").as_posix()


def experts_recipe(directory: Path) -> Path:
    """The micro recipe's experts phase alone, 2 steps (a random, untrained base)."""
    path = directory / "experts.toml"
    path.write_text(
        f'extends = "{MICRO}"\nname = "paths"\n\n'
        '[[phases]]\nname = "experts"\ntrainer = "joint"\nsteps = 2\nbatch_size = 8\nlr = 1e-2\n'
        'losses = ["lm", { name = "load_balance", weight = 0.01 }]\nlog_every = 1\n'
    )
    return path


def base_recipe(directory: Path) -> Path:
    """The micro recipe's dense base phase alone, not cached: its weights stay in the run directory."""
    path = directory / "base.toml"
    path.write_text(
        f'extends = "{MICRO}"\nname = "base-only"\n\n'
        '[[phases]]\nname = "base"\ntrainer = { name = "base_pretrain", cache = false }\nsteps = 4\n'
        "batch_size = 8\nlr = 3e-3\nlog_every = 1\n"
    )
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("srde: error: ")
    return err[0]


class AutocastProbe:
    """Records, inside every training forward, whether CPU autocast is on and its dtype."""

    def __init__(self):
        self.seen: list[tuple[bool, torch.dtype]] = []

    @hookimpl
    def srde_forward_context(self, context):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("run-paths")
    experts_recipe(directory)
    base_recipe(directory)
    return directory


@pytest.fixture(scope="module")
def probe_plugins():
    probe = AutocastProbe()
    return probe, load_plugins(extra=[("autocast-probe", probe)])


@pytest.fixture(scope="module")
def finished(workdir, probe_plugins) -> Path:
    """A finished 2-step experts run (fp32: precision 'auto' on CPU)."""
    probe, plugins = probe_plugins
    probe.seen.clear()
    run_recipe_in(workdir, workdir / "experts.toml", plugins)
    assert probe.seen == [(False, probe.seen[0][1])] * 2
    return workdir / "runs" / "paths"


@pytest.fixture(scope="module")
def base_runs(workdir, plugins) -> dict[str, Path]:
    """The un-cached base phase with the default clipping (1.0), without (0) and with a bound no
    gradient reaches (1e9)."""
    runs = {}
    for name, norm in (("clip", 1.0), ("noclip", 0), ("huge", 1e9)):
        run_recipe_in(workdir, workdir / "base.toml", plugins, [f"name={name}", f"phases.base.max_grad_norm={norm}"])
        runs[name] = workdir / "runs" / name
    return runs


# -- starting, resuming ----------------------------------------------------------------------------


def test_fresh_deletes_the_old_run_directory_and_starts_over(workdir, finished, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    stale = workdir / "runs" / "fresh"
    shutil.copytree(finished, stale)
    (stale / "stale-marker").write_text("from an earlier run")
    recipe = str(workdir / "experts.toml")
    assert main(["run", recipe, "--set", "name=fresh"]) == 1  # refused without --fresh
    assert "pass --resume to continue it or --fresh" in capsys.readouterr().err
    assert main(["run", recipe, "--set", "name=fresh", "--fresh"]) == 0
    assert not (stale / "stale-marker").exists()
    assert [r["step"] for r in metrics(stale) if r.get("phase") == "experts"] == [1, 2]  # not appended to the old log
    assert json.loads((stale / "recipe.json").read_text())["recipe"]["name"] == "fresh"
    assert (stale / "adapter.safetensors").is_file()


def test_resume_and_fresh_exclude_each_other(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["run", str(workdir / "experts.toml"), "--resume", "--fresh"]) == 2  # a command-line mistake
    assert "--resume and --fresh exclude each other" in one_error_line(capsys)


def test_resume_without_a_run_directory_ends_in_one_line(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["run", str(workdir / "experts.toml"), "--set", "name=never-ran", "--resume"]) == 1
    line = one_error_line(capsys)
    assert "runs/never-ran" in line and "no run to resume here (pass the recipe that started it)" in line
    assert not (workdir / "runs" / "never-ran").exists()


# -- checkpoint format versions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (+1, f"checkpoint format {FORMAT_VERSION + 1} is newer than this srde reads ({FORMAT_VERSION})"),
        (-1, f"checkpoint format {FORMAT_VERSION - 1} is older than this srde reads ({FORMAT_VERSION}); "
             "start the run again with --fresh"),
    ],
    ids=["newer", "older"],
)
def test_resume_from_a_checkpoint_of_another_format_ends_in_one_line(finished, workdir, offset, message, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    checkpoint = finished / "checkpoints" / "experts-step0000002"
    original = (checkpoint / "trainer.pt").read_bytes()
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    assert state["format_version"] == FORMAT_VERSION
    torch.save({**state, "format_version": FORMAT_VERSION + offset}, checkpoint / "trainer.pt")
    try:
        assert main(["run", str(workdir / "experts.toml"), "--resume"]) == 1
        line = one_error_line(capsys)
    finally:
        (checkpoint / "trainer.pt").write_bytes(original)
    assert line == f"srde: error: {Path('runs/paths/checkpoints/experts-step0000002')}: {message}"


# -- reopening a run (srde eval) -------------------------------------------------------------------


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 1
    assert one_error_line(capsys) == f"srde: error: {tmp_path}: not a run directory (no recipe.json)"


def test_eval_of_an_unfinished_run_ends_in_one_line(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(finished.parents[1])
    copy = tmp_path / "unfinished"
    shutil.copytree(finished, copy)
    (copy / "base.json").unlink()
    assert main(["eval", str(copy)]) == 1
    line = one_error_line(capsys)
    assert line == f"srde: error: {copy}: the run has not finished (no base.json); finish it with srde run --resume"


def test_eval_when_the_base_weights_are_gone_ends_in_one_line(base_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(base_runs["clip"].parents[1])
    copy = tmp_path / "weights-gone"
    shutil.copytree(base_runs["clip"], copy)
    weights = copy / "base" / "model.safetensors"
    base = json.loads((copy / "base.json").read_text())
    (copy / "base.json").write_text(json.dumps({**base, "weights": str(weights)}))
    weights.unlink()
    assert main(["eval", str(copy)]) == 1
    line = one_error_line(capsys)
    assert line == f"srde: error: {copy}: base weights {weights} are gone (cache cleared?); re-run the recipe"


# -- an un-cached base_pretrain --------------------------------------------------------------------


def test_uncached_base_keeps_its_weights_in_the_run_directory(base_runs, workdir):
    run_dir = base_runs["clip"]
    base = json.loads((run_dir / "base.json").read_text())
    weights = run_dir / "base" / "model.safetensors"
    assert base["weights"] == str(weights.resolve())
    assert base["id"].startswith("Ministral3ForCausalLM:pretrained-")
    assert not (workdir / ".cache" / "srde" / "base").exists()  # nothing went to the base cache
    assert not (run_dir / "adapter.safetensors").exists()  # no phase trained experts


def test_eval_reopens_an_uncached_base_from_the_run_directory(base_runs, capsys, monkeypatch):
    from srde_core.run import open_finished_run

    run_dir = base_runs["clip"]
    monkeypatch.chdir(run_dir.parents[1])
    run = open_finished_run(run_dir, Console(file=io.StringIO()))
    saved = load_file(run_dir / "base" / "model.safetensors")
    state = run.model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert run.experts is None
    assert main(["eval", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["routing"] is None and (run_dir / "eval.json").is_file()


# -- gradient clipping -----------------------------------------------------------------------------


def test_max_grad_norm_zero_does_not_clip(base_runs):
    clip, noclip, huge = (metrics(base_runs[n]) for n in ("clip", "noclip", "huge"))
    assert [r["step"] for r in noclip] == [1, 2, 3, 4]
    # the logged norm is the norm before clipping: the same first step, and above the bound of 1
    assert noclip[0]["grad_norm"] == pytest.approx(clip[0]["grad_norm"], rel=1e-5)
    assert all(r["grad_norm"] > 1.0 for r in noclip)
    # 0 means no clipping: the same trajectory as a bound no gradient reaches ...
    for a, b in zip(noclip, huge):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # ... and not the clipped one (clipping changed the later steps), nor a frozen model
    assert abs(noclip[-1]["loss"] - clip[-1]["loss"]) > 1e-4
    assert noclip[-1]["loss"] < noclip[0]["loss"]


# -- precision -------------------------------------------------------------------------------------


def test_bf16_autocast_runs_a_phase_on_cpu(workdir, finished, probe_plugins):
    probe, plugins = probe_plugins
    probe.seen.clear()
    run_recipe_in(workdir, workdir / "experts.toml", plugins, ["name=bf16", 'phases.experts.precision="bf16"'])
    assert probe.seen == [(True, torch.bfloat16)] * 2  # every training forward ran under bf16 autocast
    bf16, fp32 = metrics(workdir / "runs" / "bf16"), metrics(finished)
    assert [r["step"] for r in bf16] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)
    # the same batch through the same initial weights: close, but computed in another precision
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2) and bf16[0]["loss"] != fp32[0]["loss"]
    adapter = load_file(workdir / "runs" / "bf16" / "adapter.safetensors")
    assert {v.dtype for k, v in adapter.items() if k.endswith(".values")} == {torch.float32}  # master weights


# -- the base model from a local directory, or from nowhere ----------------------------------------


def test_base_model_from_a_local_directory(workdir, plugins, tmp_path):
    import transformers

    from srde_core.data.params import TokenizerParams
    from srde_core.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TokenizerParams())
    config = transformers.Ministral3Config(
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
    )
    torch.manual_seed(1234)  # weights the run's own seed would not make
    model = transformers.Ministral3ForCausalLM(config)
    local = tmp_path / "my-base"
    model.save_pretrained(local)
    saved = load_file(local / "model.safetensors")

    run = run_recipe_in(workdir, workdir / "experts.toml", plugins, ["name=local", f'model.name_or_path="{local}"'])
    assert json.loads((workdir / "runs" / "local" / "base.json").read_text())["id"] == str(local)
    embed = run.model.get_input_embeddings().weight
    assert torch.equal(embed, saved["model.embed_tokens.weight"])
    attention = run.model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(attention, saved["model.layers.1.self_attn.q_proj.weight"])
    assert (workdir / "runs" / "local" / "adapter.safetensors").is_file()


def test_a_model_path_that_does_not_exist_ends_in_one_line(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    missing = tmp_path / "no-such-model"
    code = main(["run", str(workdir / "experts.toml"), "--set", "name=missing", "--set", f'model.name_or_path="{missing}"'])
    assert code == 1
    line = one_error_line(capsys)
    assert "experts.toml: model.name_or_path: cannot load model" in line and str(missing) in line
    assert not (workdir / "runs" / "missing").exists()
