"""Experiment trackers (`srde_plugins.tracking`): TensorBoard event files and an offline W&B run
carry the run's logged metrics; a tracker that fails to start is one line or a warning."""

from __future__ import annotations

import glob
import json

import pytest

from srde_core.errors import SRDEError


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, plugins):
    import os

    from conftest import RECIPES, run_recipe_in

    os.environ.setdefault("WANDB_SILENT", "true")
    workdir = tmp_path_factory.mktemp("tracked")
    run_recipe_in(workdir, RECIPES / "micro.toml", plugins, [
        "plugins.tensorboard.enabled=true", "plugins.wandb.enabled=true", "phases.experts.log_every=1",
    ])
    run_dir = workdir / "runs" / "micro"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, metrics


def test_tensorboard_has_every_logged_scalar(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"experts/loss", "experts/lm", "experts/load_balance", "experts/lr", "experts/grad_norm",
            "experts/router_max_load", "experts/router_entropy", "base/loss"} <= tags
    assert {"eval/routing_layer0", "eval/routing_layer1"} <= set(events.Tags()["images"])
    experts = [m for m in metrics if m["phase"] == "experts"]
    logged = events.Scalars("experts/loss")
    assert [e.step for e in logged] == [m["step"] for m in experts]
    assert [e.value for e in logged] == pytest.approx([m["loss"] for m in experts], rel=1e-6)


def test_offline_wandb_run_holds_the_metrics(tracked_run):
    run_dir, metrics = tracked_run
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    data = open(files[0], "rb").read()
    last = metrics[-1]
    assert b"experts/lm" in data and json.dumps(last["lm"]).encode() in data


def test_a_tracker_that_cannot_start_stops_the_run_in_one_line_or_warns(tmp_path, plugins, micro_recipe):
    from conftest import run_recipe_in

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = ["plugins.tensorboard.enabled=true", f'plugins.tensorboard.log_dir="{blocker / "tb"}"']
    with pytest.raises(SRDEError, match="tracker 'tensorboard' failed to start"):
        run_recipe_in(tmp_path, micro_recipe, plugins, bad)
    run = run_recipe_in(tmp_path, micro_recipe, plugins, [*bad, 'plugins.tensorboard.on_error="continue"'], fresh=True)
    assert (tmp_path / "runs" / "micro" / "adapter.safetensors").is_file() and run.experts is not None
