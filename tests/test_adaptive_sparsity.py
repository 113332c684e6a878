"""Adaptive sparsity (`srde_plugins.sparsity`, the `adaptive` schedule of `srde_plugins.schedules`):
the warm-up follows the loss trend, banks keep their most important entries, pruning is exact, and a
resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from srde_plugins.schedules import AdaptiveParams
from srde_plugins.schedules.adaptive import AdaptiveRamp


def ramp(**params):
    return AdaptiveRamp(AdaptiveParams(**{"start": 0.05, "end": 0.01, "steps": 100, "patience": 5, **params}))


def drive(schedule, losses):
    for step, loss in enumerate(losses, start=1):
        schedule.observe(step, {"loss": loss})
    return schedule


def test_the_warmup_shortens_while_the_loss_improves_and_lengthens_when_it_stalls():
    improving = drive(ramp(), [2.0 * 0.97**i for i in range(60)])
    stalling = drive(ramp(), [2.0 + 0.01 * (i % 2) + 0.001 * i for i in range(60)])
    steady = drive(ramp(threshold=1.0), [2.0 * 0.97**i for i in range(60)])  # improvements below threshold
    assert improving.warmup_steps() < 100 < stalling.warmup_steps()
    assert steady.warmup_steps() == 100
    assert improving.progress > steady.progress > stalling.progress


def test_the_warmup_length_stays_within_its_bounds():
    fast = drive(ramp(min_steps=80), [2.0 * 0.9**i for i in range(200)])
    slow = drive(ramp(max_steps=120), [2.0 + 0.001 * i for i in range(200)])
    assert fast.warmup_steps() == pytest.approx(80) and slow.warmup_steps() == pytest.approx(120)


def test_value_goes_from_start_to_end_and_state_round_trips():
    schedule = ramp()
    assert schedule.value(0, 100) == 0.05
    drive(schedule, [1.0] * 500)
    assert schedule.value(500, 500) == pytest.approx(0.01)
    half = drive(ramp(), [2.0 * 0.97**i for i in range(30)])
    copy = ramp()
    copy.load_state_dict(json.loads(json.dumps(half.state_dict())))
    for schedule in (half, copy):
        drive(schedule, [1.5 * 0.99**i for i in range(30)])
    assert copy.state_dict() == half.state_dict()


def test_bank_keeps_the_most_important_entries_prunes_exactly_and_moves_optimiser_state():
    from test_exactness import assert_matches, build_layer


    mlp = build_layer("sparse", "random", 16, 24, 3, 2)
    bank = mlp.banks["up_proj"]
    score = torch.sigmoid(bank.importance) * bank.values.abs()
    bank.set_active_fraction(0.25)
    keep = round(0.25 * bank.count)
    assert bank.active.sum(1).tolist() == [keep] * 3
    assert bool((score[bank.active].view(3, keep).min(1).values >= score.masked_fill(bank.active, -1).max(1).values).all())
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)  # masked: the reference sees the same deltas
    before = mlp(x).detach()
    events = []
    bank.add_remap_listener(events.append)
    remaps = bank.prune()
    assert bank.count == keep and events == [remaps] and {r.new.shape for r in remaps} == {(3, keep)}
    # pruning drops only entries that were already zero: the same output up to the order of float sums
    torch.testing.assert_close(mlp(x).detach(), before, rtol=0, atol=1e-6)
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    assert bank.prune() == []  # nothing masked any more


@pytest.mark.parametrize("block", [(1, 1), (4, 4)], ids=["entries", "blocks"])
def test_a_run_with_adaptive_sparsity_prunes_and_resumes_exactly(tmp_path, plugins, micro_recipe, block):
    from conftest import run_recipe_in

    overrides = [
        "srde.delta.density=0.2", f"srde.delta.block={list(block)}", "plugins.adaptive_sparsity.enabled=true",
        'plugins.adaptive_sparsity.density={ name = "adaptive", start = 0.2, end = 0.05, steps = 4, patience = 2 }',
        "phases.experts.log_every=1", "phases.experts.steps=8", "phases.experts.checkpoint_every=3",
    ]
    run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    run_dir = tmp_path / "runs" / "micro"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    experts = [m for m in metrics if m["phase"] == "experts"]
    assert experts[0]["density"] == pytest.approx(0.1625) and experts[-1]["density"] == pytest.approx(0.05)
    # whole blocks: a block of 16 is 0.2% of a 64x128 weight, so the density in use is coarser
    assert experts[-1]["density_in_use"] == pytest.approx(0.05, rel=0.02 if block == (1, 1) else 0.05)
    full = load_file(run_dir / "adapter.safetensors")
    suffix = "up_proj.positions" if block == (1, 1) else "up_proj.blocks"
    positions = [v for k, v in full.items() if k.endswith(suffix)][0]
    assert positions.shape[1] < 0.3 * 0.2 * 64 * 128 / (block[0] * block[1])  # pruned well below the initial 20%

    # Kill after the checkpoint at step 6 (the banks are pruned by then) and resume in a fresh process state.
    shutil.rmtree(run_dir / "checkpoints" / "experts-step0000008")
    (run_dir / "adapter.safetensors").unlink()
    run_recipe_in(tmp_path, micro_recipe, plugins, overrides, resume=True)
    resumed = load_file(run_dir / "adapter.safetensors")
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] == experts[-1]["loss"] and last["step"] == 8


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential", "adaptive"])
def test_every_density_schedule_says_when_it_is_done(plugins, schedule):
    from srde_core.recipe import resolve_component

    spec = {"name": schedule, "start": 0.05, "end": 0.01, "steps": 10}
    built = resolve_component(plugins, "schedule", spec).build()
    for step in range(1, 30):
        built.observe(step, {"loss": 1.0})
    assert built.done(30, 30)
    fresh = resolve_component(plugins, "schedule", spec).build()
    assert not fresh.done(0, 30)


@pytest.mark.parametrize("selector", ['{ name = "spiel" }', '{ name = "gumbel_topk" }'])
def test_adaptive_sparsity_with_a_selector_that_moves_entries_is_refused_before_any_work(tmp_path, plugins, micro_recipe, selector):
    from conftest import run_recipe_in

    from srde_core.errors import SRDEError

    overrides = [f'srde.delta={{ name = "sparse", density = 0.2, block = [4, 4], selector = {selector} }}',
                 "plugins.adaptive_sparsity.enabled=true"]
    with pytest.raises(SRDEError, match=r"plugins.adaptive_sparsity: adaptive sparsity and selector '\w+' would both") as err:
        run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_masked_entries_do_not_drift_under_adam_and_keep_their_values_for_the_ranking():
    """A masked entry gets no gradient, but AdamW's momentum (and weight decay) would still move it;
    the controller puts masked entries back after every step, so a masked entry keeps the value it
    had when it was masked, and the next ranking reads that value."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from test_exactness import build_layer
    from test_exactness_contracts import session_for

    from srde_core.plugins import load_plugins
    from srde_core.recipe import resolve_component
    from srde_plugins.sparsity.controller import Controller

    plugins = load_plugins()
    mlp = build_layer("sparse", "random", 16, 24, 3, 2)
    session = session_for(mlp)
    run = SimpleNamespace(
        experts=SimpleNamespace(banks=lambda: {0: dict(mlp.banks)}),
        recipe=SimpleNamespace(srde=SimpleNamespace(delta=SimpleNamespace(name="sparse", params=SimpleNamespace(density=0.1)))),
    )
    density = resolve_component(plugins, "schedule", {"name": "constant", "value": 0.05})
    controller = Controller(run, SimpleNamespace(density=density, prune=False, phases=[]))
    controller.before_phase(SimpleNamespace(name="experts"))
    phase = SimpleNamespace(steps=20)
    generator = torch.Generator().manual_seed(3)
    previous = None
    checked = 0
    for step in range(1, 7):
        x, y = torch.randn(20, 16, generator=generator), torch.randn(20, 16, generator=generator)
        session.backward(F.mse_loss(mlp(x), y))
        session.step()
        controller.after_step(phase, step, {"loss": 1.0})
        state = {name: (bank.active.clone(), bank.values.detach().clone()) for name, bank in mlp.banks.items()}
        if previous is not None:
            for name, (active, values) in state.items():
                still_masked = ~active & ~previous[name][0]
                assert bool(still_masked.any())
                assert torch.equal(values[still_masked], previous[name][1][still_masked]), (name, step)
                checked += int(still_masked.sum())
        previous = state
    assert checked > 0
    # the held values go with the controller's state (checkpoints): a fresh controller continues
    restored = Controller(run, SimpleNamespace(density=density, prune=False, phases=[]))
    restored.load_state_dict(controller.state_dict())
    assert restored.held.keys() == controller.held.keys()
