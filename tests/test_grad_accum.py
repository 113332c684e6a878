"""Gradient accumulation: ``grad_accum = k`` at ``batch_size = b`` is the same optimiser step as
``grad_accum = 1`` at ``batch_size = k * b``.

Both see the same examples at every optimiser step: micro-batch ``i`` of the sampler holds examples
``[i * b, (i + 1) * b)`` of the epoch's order and optimiser step ``s`` takes micro-batches
``s * k .. s * k + k - 1``, i.e. examples ``[s * k * b, (s + 1) * k * b)``, the big batch of step ``s``.

The LM loss is a token mean per micro-batch and the accumulated loss is the mean of the ``k``
micro-batch means, which equals the token mean of the big batch only when every micro-batch has the
same number of labelled tokens. ``seq_len = 8`` truncates every example of the corpus to exactly 8
tokens (no padding), so the two runs compute the same loss and gradients up to float32 rounding. Only
the ``lm`` loss is used: the load balance loss is not linear in the batch (``E * sum f * P`` of a
micro-batch), so it is not accumulation-invariant by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES, run_recipe_in

STEPS, ACCUM, MICRO = 6, 2, 4


def write_recipe(directory: Path) -> Path:
    path = directory / "accum.toml"
    path.write_text(
        f'extends = "{(RECIPES / "micro.toml").as_posix()}"\n'
        'name = "accum"\n\n'
        "[data]\nseq_len = 8\n\n"
        "[[phases]]\n"
        'name = "experts"\n'
        'trainer = "joint"\n'
        f"steps = {STEPS}\n"
        "batch_size = 8\n"
        "lr = 1e-2\n"
        'losses = ["lm"]\n'
        "max_grad_norm = 0\n"
        "log_every = 1\n"
    )
    return path


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase") == "experts"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, plugins):
    workdir = tmp_path_factory.mktemp("accum")
    recipe = write_recipe(workdir)
    big = run_recipe_in(workdir, recipe, plugins, ["name=big", f"phases.experts.batch_size={ACCUM * MICRO}"])
    small = run_recipe_in(
        workdir, recipe, plugins,
        ["name=accumulated", f"phases.experts.batch_size={MICRO}", f"phases.experts.grad_accum={ACCUM}"],
    )
    # run_dir is relative to the working directory the run had
    big.run_dir, small.run_dir = workdir / big.run_dir, workdir / small.run_dir
    return big, small


def test_every_example_has_the_same_number_of_tokens(runs):
    big, _ = runs
    lengths = {len(ids) for ids in big.data.train["input_ids"]}
    assert lengths == {8}


def test_both_runs_see_the_same_examples_at_every_optimiser_step(runs):
    from srde_core.train.driver import Batches

    big, small = runs
    big_batches, small_batches = Batches(big, big.recipe.phases[0]), Batches(small, small.recipe.phases[0])
    for step in range(STEPS):
        micro = [i for m in range(ACCUM) for i in small_batches.indices(step * ACCUM + m)]
        assert micro == big_batches.indices(step)


def test_per_step_losses_and_gradient_norms_agree(runs):
    big, small = runs
    expected, got = records(big.run_dir), records(small.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for e, g in zip(expected, got):
        # The loss of step 1 is computed before any update: float32 summation order only.
        for key in ("loss", "lm", "grad_norm", "lr", "router_entropy"):
            assert g[key] == pytest.approx(e[key], rel=2e-5), (g["step"], key)
    assert {r["loss"] for r in got} != {got[0]["loss"]}  # it trained


def test_final_adapters_agree(runs):
    big, small = runs
    expected = load_file(big.run_dir / "adapter.safetensors")
    got = load_file(small.run_dir / "adapter.safetensors")
    assert expected.keys() == got.keys()
    moved = 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
        moved += int(key.endswith(".values") and expected[key].abs().sum() > 0)
    assert moved


@pytest.fixture(scope="module")
def uneven_runs(tmp_path_factory, plugins):
    """One optimiser step each, on the micro corpus at ``seq_len = 48``: examples of different
    lengths, so the two micro-batches of a step hold different numbers of labelled tokens."""
    workdir = tmp_path_factory.mktemp("accum-uneven")
    recipe = write_recipe(workdir)
    common = ["data.seq_len=48", "phases.experts.steps=1"]
    big = run_recipe_in(workdir, recipe, plugins, [*common, "name=big", f"phases.experts.batch_size={ACCUM * MICRO}"])
    small = run_recipe_in(
        workdir, recipe, plugins,
        [*common, "name=accumulated", f"phases.experts.batch_size={MICRO}", f"phases.experts.grad_accum={ACCUM}"],
    )
    return workdir / big.run_dir, workdir / small.run_dir, small


def test_accumulation_weights_micro_batches_by_their_labelled_tokens(uneven_runs):
    """The first step's loss (before any update) of ``k`` accumulated micro-batches must be the token
    mean over the whole step, as the big batch computes it; a mean of per-micro-batch means weights
    the tokens of a short micro-batch more."""
    from srde_core.train.driver import Batches

    big_dir, small_dir, small = uneven_runs
    batches = Batches(small, small.recipe.phases[0])
    labelled = [int((batches.get(m)["labels"][:, 1:] != -100).sum()) for m in range(ACCUM)]
    assert len(set(labelled)) > 1, labelled  # the case this test is about
    expected, got = records(big_dir)[0], records(small_dir)[0]
    assert got["loss"] == pytest.approx(expected["loss"], rel=2e-5), f"labelled tokens per micro-batch: {labelled}"
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=2e-5), f"labelled tokens: {labelled}"
