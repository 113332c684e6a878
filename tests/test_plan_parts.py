"""`srde plan` asks the parts for their memory: a delta bank for what its forward keeps
(``DeltaBank.activation_bytes``), a bank's selectors for what they allocate at their peak step
(``transient_bytes``), the engine for its sharding and what the rows call it (``EngineMemory``)."""

from __future__ import annotations

import types

import pytest
import torch
from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.model.components import DeltaBank, DeltaType
from srde_core.params import Params
from srde_core.recipe import load_recipe
from srde_plugins.runtime.plan import plan_memory

VOCAB = 256


class DeclaredParams(Params):
    per_routed_token: int = Field(0, ge=0, description="bytes the bank keeps per routed token")


class DeclaredBank(DeltaBank):
    """Dense deltas whose forward keeps ``per_routed_token`` bytes per routed token (declared)."""

    trainable_names = ("deltas",)

    def __init__(self, out_features, in_features, num_experts, per_routed_token, device):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.per_routed_token = per_routed_token
        self.deltas = torch.nn.Parameter(torch.zeros(num_experts, out_features, in_features, device=device))

    def forward(self, x, call):
        terms = torch.einsum("tkoi,ti->tko", self.deltas.to(x.dtype)[call.routing.experts], x)
        return (call.routing.weights.to(x.dtype).unsqueeze(-1) * terms).sum(1)

    def delta_weight(self, expert):
        return self.deltas[expert]

    def activation_bytes(self, tokens, top_k, cache):
        return self.per_routed_token * tokens * top_k


class Declared(DeltaType):
    def __init__(self, params):
        self.per_routed_token = params.per_routed_token

    def make_bank(self, weight, num_experts, generator):
        return DeclaredBank(*weight.shape, num_experts, self.per_routed_token, weight.device)


@hookimpl
def srde_register(registry):
    registry.add("delta", "declared", Declared, DeclaredParams, "Dense deltas that declare their activations.")


@pytest.fixture(scope="module")
def kit():
    from srde_core.plugins import load_plugins

    plugins = load_plugins(extra=[("declared-delta", types.SimpleNamespace(srde_register=srde_register))])
    assert not plugins.broken, plugins.broken_note()
    return plugins


def plan_of(plugins, micro_recipe, *overrides, gpus=1):
    recipe = load_recipe(micro_recipe, plugins, list(overrides))
    return recipe, plan_memory(recipe, gpus=gpus, tokenizer_vocab=VOCAB, phase="experts", device="cpu")


def test_a_third_party_deltas_declared_activation_bytes_change_the_plan_by_that_amount(kit, micro_recipe):
    _, quiet = plan_of(kit, micro_recipe, 'srde.delta={ name = "declared" }')
    recipe, loud = plan_of(kit, micro_recipe, 'srde.delta={ name = "declared", per_routed_token = 1000 }')
    phase = recipe.phases[-1]
    tokens, top_k = phase.batch_size * recipe.data.seq_len, 2  # micro: uniform layout, top_k = 2
    declared = 1000 * tokens * top_k * 3 * 2  # three projections in each of the two layers
    assert loud.row("activations").bytes - quiet.row("activations").bytes == declared
    # and one layer's backward holds that layer's share (micro's layer outweighs its LM chunk)
    assert loud.row("backward peak").bytes - quiet.row("backward peak").bytes == declared // 2
    assert loud.total - quiet.total == declared + declared // 2


def test_the_sparse_bank_counts_its_gathered_inputs_once_for_gate_and_up(plugins, micro_recipe):
    recipe, cached = plan_of(plugins, micro_recipe)
    _, uncached = plan_of(plugins, micro_recipe, "srde.delta.cache_inputs=false")
    tokens = recipe.phases[-1].batch_size * recipe.data.seq_len
    hidden, inter = 64, 128  # micro's
    per_layer = 4 * 2 * tokens * (hidden + inter)  # fp32, top_k copies: gate/up's input once, down's
    assert cached.row("activations").bytes - uncached.row("activations").bytes == 2 * per_layer


@pytest.mark.parametrize("spiel, dense", [('{ name = "spiel", grow = "dense" }', True),
                                          ('{ name = "spiel" }', True),
                                          ('{ name = "spiel", pool = "uniform" }', False)],
                         ids=["grow-dense", "pool-gradient", "pool-uniform"])
def test_spiel_counts_its_one_step_dense_gradient(plugins, micro_recipe, spiel, dense):
    _, plan = plan_of(plugins, micro_recipe, f"srde.delta.selector={spiel}")
    names = [row.name for row in plan.rows]
    if not dense:
        assert "selectors' buffers" not in names
        return
    # [E, out, in] fp32 per bank: 4 experts x 128 x 64 entries, three projections in two layers
    assert plan.row("selectors' buffers").bytes == 4 * 4 * 128 * 64 * 3 * 2


def test_the_engine_names_its_sharding_in_the_rows(plugins, micro_recipe):
    _, zero = plan_of(plugins, micro_recipe, 'engine={ name = "deepspeed", zero_stage = 3 }', gpus=4)
    assert zero.row("gradients").detail == "/ 4 (ZeRO-3)" and "(ZeRO-3)" in zero.row("frozen params (float32)").detail
    assert "DeepSpeed" in zero.row("gradient bucket").detail
    _, ddp = plan_of(plugins, micro_recipe, 'engine="ddp"', gpus=4)
    assert "ZeRO" not in " ".join(row.detail for row in ddp.rows)
