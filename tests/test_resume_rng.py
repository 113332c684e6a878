"""Exact resume of a run whose training draws from the global RNGs (torch, Python, NumPy).

A test plugin registers a loss that draws fresh noise from the global generators at every training
forward and adds it to the objective, so the trajectory depends on the RNG state at every step. A
run stopped after its checkpoint at step 4 (a ``KeyboardInterrupt`` raised from
``srde_after_step`` at step 5, as Ctrl-C would) and resumed must end exactly where the
uninterrupted run ends: that needs the engine state, the RNG state and the data position restored.
The load-balance weight is an ``adaptive`` schedule, whose ramp follows the loss trend step by step:
its state (progress, rate, moving average) must come back from the checkpoint too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams
from srde_core.plugins import load_plugins

from conftest import RECIPES, run_recipe_in

STEPS, CHECKPOINT_EVERY, STOP_AT = 6, 2, 5


def noise_loss(params):
    """A loss term driven by the global RNGs: hidden-state mean . (torch noise) * (python/numpy noise)."""

    def loss(inputs):
        direction = torch.randn(inputs.hidden.shape[-1])
        scale = 1.0 + random.random() + float(np.random.rand())
        return scale * (inputs.hidden.float().mean(dim=(0, 1)) * direction).sum()

    return loss


class NoisePlugin:
    """Registers the ``rng_noise`` loss; interrupts the experts phase after step ``stop_at``."""

    def __init__(self):
        self.stop_at: int | None = None

    @hookimpl
    def srde_register(self, registry):
        registry.add("loss", "rng_noise", noise_loss, NoParams, "Noise from the global RNGs (tests only).")

    @hookimpl
    def srde_after_step(self, phase, step):
        if phase.name == "experts" and step == self.stop_at:
            raise KeyboardInterrupt


def write_recipe(directory: Path) -> Path:
    """The micro recipe's experts phase alone (random base), with the noise loss."""
    path = directory / "noisy.toml"
    path.write_text(
        f'extends = "{(RECIPES / "micro.toml").as_posix()}"\n'
        'name = "noisy"\n\n'
        "[[phases]]\n"
        'name = "experts"\n'
        'trainer = "joint"\n'
        f"steps = {STEPS}\n"
        "batch_size = 8\n"
        "lr = 1e-2\n"
        'losses = ["lm", { name = "load_balance", weight = { name = "adaptive", start = 0.0, end = 0.05, steps = 8,'
        ' patience = 1 } }, { name = "rng_noise", weight = 1.0 }]\n'
        f"checkpoint_every = {CHECKPOINT_EVERY}\n"
        "keep_checkpoints = 2\n"
        "log_every = 1\n"
    )
    return path


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if r.get("phase") == "experts"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference run dir, resumed run dir, checkpoints left by the interrupted run, resumed run);
    one working directory, so the second and third runs reuse the corpus and tokenisation caches."""
    plugin = NoisePlugin()
    plugins = load_plugins(extra=[("rng-noise", plugin)])
    workdir = tmp_path_factory.mktemp("resume-rng")
    recipe = write_recipe(workdir)
    run_recipe_in(workdir, recipe, plugins, ["name=reference"])

    plugin.stop_at = STOP_AT
    with pytest.raises(KeyboardInterrupt):
        run_recipe_in(workdir, recipe, plugins)
    plugin.stop_at = None
    interrupted = sorted(p.name for p in (workdir / "runs" / "noisy" / "checkpoints").iterdir())
    assert not (workdir / "runs" / "noisy" / "adapter.safetensors").exists()
    run = run_recipe_in(workdir, recipe, plugins, resume=True)
    return workdir / "runs" / "reference", workdir / "runs" / "noisy", interrupted, run


def test_the_run_was_interrupted_after_the_step_4_checkpoint(runs):
    _, _, interrupted, run = runs
    assert interrupted == ["experts-step0000002", "experts-step0000004"]
    assert "experts: resumed from experts-step0000004" in run.console.file.getvalue()


def test_the_noise_reaches_training(runs):
    reference, *_ = runs
    values = [r["rng_noise"] for r in records(reference)]
    assert len(set(values)) == STEPS and all(abs(v) > 1e-6 for v in values)


def test_resumed_run_logs_every_step_once_with_the_uninterrupted_metrics(runs):
    reference, resumed, *_ = runs
    expected, got = records(reference), records(resumed)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    # exactly equal: the same process, the same arithmetic, the same RNG draws
    assert got == expected


def test_resumed_adapter_equals_the_uninterrupted_one_exactly(runs):
    reference, resumed, *_ = runs
    expected = load_file(reference / "adapter.safetensors")
    got = load_file(resumed / "adapter.safetensors")
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_the_adaptive_loss_weight_resumes_where_it_was(runs):
    reference, resumed, *_ = runs
    expected = [r["load_balance_weight"] for r in records(reference)]
    got = [r["load_balance_weight"] for r in records(resumed)]
    # the ramp's rate followed the loss trend: not the nominal 0.05 * step / 8 of a fixed rate
    nominal = [0.05 * min(1.0, step / 8) for step in range(STEPS)]
    assert expected[0] == 0.0 and all(b > a for a, b in zip(expected, expected[1:]))
    assert any(abs(e - n) > 1e-6 for e, n in zip(expected[CHECKPOINT_EVERY * 2:], nominal[CHECKPOINT_EVERY * 2:]))
    # after the resume at step 4 the weight goes on from the checkpointed state, exactly
    assert got == expected
