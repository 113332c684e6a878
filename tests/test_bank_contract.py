"""What a delta bank says about itself (``DeltaBank.density``, ``active_entries``, ``active_mask``):
the built-in sparse banks count their entries, and adaptive sparsity reads only the contract, so a
third-party sparse delta with params and parameters of its own shape works with it."""

from __future__ import annotations

import json
import types

import pytest
import torch
from pydantic import Field
from torch import nn

from srde_core.hookspecs import hookimpl
from srde_core.model.components import BankCall, DeltaBank, DeltaType
from srde_core.params import Params


# ---- an out-of-tree sparse delta: dense [E, out, in] values under a strided mask, no `density` param ----
class StridedParams(Params):
    stride: int = Field(4, ge=1, description="expert e may change the entries whose flat index is e mod stride")


class StridedBank(DeltaBank):
    trainable_names = ("values",)

    def __init__(self, out_features: int, in_features: int, num_experts: int, stride: int, device):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        flat = torch.arange(out_features * in_features, device=device)
        allowed = torch.stack([(flat % stride) == (e % stride) for e in range(num_experts)])
        self.register_buffer("allowed", allowed.view(num_experts, out_features, in_features))
        self.register_buffer("active", torch.ones_like(self.allowed))
        self.values = nn.Parameter(torch.zeros(num_experts, out_features, in_features, device=device))
        self.built = len(range(0, out_features * in_features, stride))  # expert 0's entries (works on meta)

    def dense(self) -> torch.Tensor:
        return self.values * (self.allowed & self.active)

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        dense = self.dense().to(x.dtype)
        experts, weights = call.routing.experts, call.routing.weights
        terms = torch.einsum("tkoi,ti->tko", dense[experts], x)
        return (weights.to(x.dtype).unsqueeze(-1) * terms).sum(1)

    def delta_weight(self, expert: int) -> torch.Tensor:
        return self.dense()[expert]

    def density(self) -> float:
        return self.built / (self.out_features * self.in_features)

    def active_entries(self) -> int:
        return int((self.allowed & self.active).sum())

    def active_mask(self):
        return None if bool(self.active.all()) else self.active

    @torch.no_grad()
    def set_active_fraction(self, fraction: float) -> None:
        keep = max(1, round(fraction * self.built))
        score = self.values.abs().masked_fill(~self.allowed, -1.0).flatten(1)
        top = score.topk(keep, dim=1).indices
        self.active.copy_(torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True).view_as(self.active))

    @torch.no_grad()
    def prune(self):
        self.allowed &= self.active
        self.active.fill_(True)
        return []


class Strided(DeltaType):
    def __init__(self, params: StridedParams):
        self.stride = params.stride

    def make_bank(self, weight, num_experts, generator):
        return StridedBank(*weight.shape, num_experts, self.stride, weight.device)


@hookimpl
def srde_register(registry):
    registry.add("delta", "strided", Strided, StridedParams, "Experts own every stride-th entry.")


STRIDED = types.SimpleNamespace(srde_register=srde_register)


def test_a_third_party_sparse_delta_works_with_adaptive_sparsity(tmp_path, micro_recipe):
    from conftest import run_recipe_in

    from srde_core.plugins import load_plugins

    plugins = load_plugins(extra=[("strided-delta", STRIDED)])
    assert not plugins.broken, plugins.broken_note()
    overrides = [
        'srde.delta={ name = "strided", stride = 4 }', "plugins.adaptive_sparsity.enabled=true",
        'plugins.adaptive_sparsity.density={ name = "linear", start = 0.2, end = 0.05, steps = 4 }',
        "phases.experts.log_every=1",
    ]
    run = run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "micro" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m["phase"] == "experts"][-1]
    assert last["density"] == pytest.approx(0.05)
    banks = [bank for per_proj in run.experts.banks().values() for bank in per_proj.values()]
    assert banks and all(isinstance(bank, StridedBank) for bank in banks)
    for bank in banks:
        numel = bank.out_features * bank.in_features
        assert bank.density() == pytest.approx(0.25)  # as built: pruning does not change it
        # pruned to the schedule's end: round(0.05 * numel) entries per expert, counted from the mask
        assert bank.allowed.flatten(1).sum(1).tolist() == [round(0.05 * numel)] * bank.num_experts
        assert bank.active_entries() == int(bank.allowed.sum())
    in_use = sum(int(b.allowed.sum()) / b.num_experts for b in banks) / sum(b.out_features * b.in_features for b in banks)
    assert last["density_in_use"] == pytest.approx(in_use) and in_use == pytest.approx(0.05, rel=0.01)


@pytest.mark.parametrize("block", [(1, 1), (4, 4)], ids=["entries", "blocks"])
def test_the_sparse_banks_report_their_density_and_entries_from_their_mask(plugins, block):
    from srde_core.recipe import resolve_component

    spec = {"name": "sparse", "density": 0.1, "selector": "random", "block": list(block)}
    weight = torch.randn(32, 48)
    bank = resolve_component(plugins, "delta", spec).build().make_bank(weight, 3, torch.Generator().manual_seed(0))
    entries_per_cell = block[0] * block[1]
    per_expert = bank.entry_positions().shape[1]
    assert bank.density() == per_expert / weight.numel() == pytest.approx(0.1, abs=entries_per_cell / weight.numel())
    assert bank.active_entries() == 3 * per_expert and bank.active_mask() is None
    torch.nn.init.normal_(bank.values)
    bank.set_active_fraction(0.5)
    mask = bank.active_mask()
    assert mask is not None and bank.active_entries() == int(mask.sum()) * entries_per_cell < 3 * per_expert
    bank.prune()
    assert bank.active_mask() is None and bank.active_entries() == bank.entry_positions().numel()
    assert bank.density() == per_expert / weight.numel()  # as built


def test_dense_deltas_have_no_density(plugins):
    from srde_core.recipe import resolve_component

    for name in ("lora", "scale"):
        bank = resolve_component(plugins, "delta", name).build().make_bank(torch.randn(8, 6), 2, torch.Generator())
        assert bank.density() is None and bank.active_entries() is None and bank.active_mask() is None
