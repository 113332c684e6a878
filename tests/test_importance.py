"""The sparse delta's importance option: per entry (the default), per expert, or none (values only).

Each is exact against the dense reference, with entries and with blocks, under every selector
(learned ones included), after entries move, and a run with it resumes to the uninterrupted result.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_exactness import GatedMLP, _delta_type, assert_matches

from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_testkit import make_router

MODES = ["entry", "expert", "none"]
SELECTORS = ["magnitude", "random", "gumbel_topk", "spiel"]


def _layer(mode: str, selector: str, block=(1, 1), experts: int = 4, seed: int = 0) -> SRDEMLP:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = GatedMLP(16, 32).requires_grad_(False)
    delta = _delta_type("sparse", selector, importance=mode, block=list(block))
    banks = {name: delta.make_bank(getattr(base, name).weight.detach(), experts, generator) for name in PROJECTIONS}
    with torch.no_grad():
        for bank in banks.values():
            for name in bank.trainable_names:
                bank.get_parameter(name).normal_(0.0, 0.5, generator=generator)
    return SRDEMLP(base, make_router(16, experts, 2, seed), banks)


@pytest.mark.parametrize("block", [(1, 1), (4, 4)], ids=["entries", "blocks"])
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("mode", MODES)
def test_every_importance_mode_matches_the_dense_reference(mode, selector, block):
    mlp = _layer(mode, selector, block)
    x = torch.randn(19, 16, generator=torch.Generator().manual_seed(3))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [(1, 1), (4, 4)], ids=["entries", "blocks"])
def test_importance_shapes_trainable_names_and_counts(block):
    counts = {}
    for mode in MODES:
        bank = _layer(mode, "random", block).banks["up_proj"]
        values = bank.values.numel()
        if mode == "entry":
            assert bank.importance.shape == bank.values.shape and "importance" in bank.trainable_names
        elif mode == "expert":
            assert bank.importance.shape == (4,) + (1,) * (bank.values.dim() - 1)
            assert "importance" in bank.trainable_names and "importance" not in bank.resizable_state
        else:
            assert bank.importance is None and "importance" not in bank.trainable_names
            assert "importance" not in dict(bank.named_parameters())
        counts[mode] = sum(bank.get_parameter(n).numel() for n in bank.trainable_names)
        assert counts[mode] == {"entry": 2 * values, "expert": values + 4, "none": values}[mode]


@pytest.mark.parametrize("block", [(1, 1), (4, 4)], ids=["entries", "blocks"])
@pytest.mark.parametrize("mode", ["expert", "none"])
def test_moved_entries_keep_the_expert_importance_and_stay_exact(mode, block):
    mlp = _layer(mode, "random", block)
    bank = mlp.banks["gate_proj"]
    before = None if bank.importance is None else bank.importance.detach().clone()
    positions = bank.selection_positions().clone()
    grid = bank.grid_shape[0] * bank.grid_shape[1] if block != (1, 1) else bank.out_features * bank.in_features
    replaced = positions.clone()
    # move each expert's first entry to the first grid cell it does not own
    for e in range(positions.shape[0]):
        free = sorted(set(range(grid)) - set(positions[e].tolist()))[0]
        replaced[e, 0] = free
    replaced = replaced.sort(1).values
    remaps = bank.set_positions(replaced)
    assert {r.old is bank.values or r.new is bank.values for r in remaps} == {True}  # only the values move
    if before is not None:
        assert torch.equal(bank.importance, before)
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(4))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    bank.set_active_fraction(0.5)  # masking ranks by the weighted values, whatever the importance
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    bank.prune()
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["expert", "none"])
def test_a_run_with_each_importance_resumes_exactly(tmp_path, plugins, micro_recipe, mode):
    from conftest import run_recipe_in

    overrides = [f'srde.delta.importance="{mode}"', "srde.delta.density=0.2", "phases.experts.log_every=1",
                 "phases.experts.steps=6", "phases.experts.checkpoint_every=3"]
    run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    run_dir = tmp_path / "runs" / "micro"
    full = load_file(run_dir / "adapter.safetensors")
    importance = [v for k, v in full.items() if k.endswith(".importance")]
    if mode == "none":
        assert not importance
    else:
        assert importance and all(v.shape[1:].numel() == 1 for v in importance)
        assert any(bool((v != 0).any()) for v in importance)  # the per-expert logits trained
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m["phase"] == "experts"][-1]
    shutil.rmtree(run_dir / "checkpoints" / "experts-step0000006")
    (run_dir / "adapter.safetensors").unlink()
    run_recipe_in(tmp_path, micro_recipe, plugins, overrides, resume=True)
    resumed = load_file(run_dir / "adapter.safetensors")
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == last["loss"]


def test_an_unknown_importance_is_one_line_naming_the_key(tmp_path, micro_recipe):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "srde_core.cli", "validate", str(micro_recipe),
                           "--set", 'srde.delta.importance="row"'], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "srde.delta.importance" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
