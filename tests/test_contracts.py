"""Every core contract, exercised by a test plugin (`tests/contract_kit.py`) through its public surface:
a new kind, a router, a combine step, a sampler, an engine, a scalar schedule, and a bank that changes
its active fraction."""

from __future__ import annotations

import json

import pytest
import torch

import contract_kit
from srde_core.errors import PluginError
from srde_core.model.context import ForwardContext
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component

OVERRIDES = [
    "engine=counting",
    "srde.router=by_position",
    "srde.combine=scaled",
    "srde.delta=masked_dense",
    'phases.experts.trainer={ name = "probed_joint", probe = "counter" }',
    "phases.experts.sampler=in_order",
    'phases.experts.losses=["lm", { name = "load_balance", weight = { name = "switch", before = 0.5, after = 0.0, at = 3 } }]',
    "phases.experts.log_every=1",
]


@pytest.fixture(scope="module")
def kit():
    plugins = load_plugins(extra=[(contract_kit.PLUGIN, contract_kit)])
    assert not plugins.broken, plugins.broken
    return plugins


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory, kit):
    from conftest import RECIPES, run_recipe_in

    workdir = tmp_path_factory.mktemp("contracts")
    run = run_recipe_in(workdir, RECIPES / "micro.toml", kit, OVERRIDES)
    metrics = [json.loads(line) for line in (workdir / "runs" / "micro" / "metrics.jsonl").read_text().splitlines()]
    return run, [m for m in metrics if m["phase"] == "experts"], workdir


def test_a_plugin_declares_a_kind_and_its_contract_is_enforced(kit):
    registry = kit.registries["probe"]
    assert registry.spec.provider == contract_kit.PLUGIN and {"counter", "broken"} <= set(registry.names())
    assert isinstance(resolve_component(kit, "probe", "counter").build(), contract_kit.Probe)
    with pytest.raises(PluginError, match="probe 'broken' .* built WrongThing, not a contract_kit.Probe"):
        resolve_component(kit, "probe", "broken").build()


def test_a_trainer_names_a_component_of_the_new_kind_and_uses_it(kit_run):
    run, metrics, _ = kit_run
    probe = run.plugin_state("probe", lambda: None)
    assert probe.steps == list(range(6)) and run.recipe.phases[1].trainer.params.probe.name == "counter"


def test_the_engine_is_the_recipes_choice(kit_run):
    run, _, _ = kit_run
    counts = run.plugin_state("engine-counts", dict)
    assert counts == {"sessions": 2, "steps": 6 + 6}  # base and experts phases


def test_the_sampler_chooses_the_batches(kit_run):
    from srde_core.train.driver import Batches

    run, _, _ = kit_run
    batches = Batches(run, run.recipe.phases[1])
    assert batches.indices(0) == list(range(8)) and batches.indices(1) == list(range(8, 16))


def test_a_schedule_drives_a_loss_weight(kit_run):
    _, metrics, _ = kit_run
    assert [m["load_balance_weight"] for m in metrics] == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]


def test_the_router_and_the_combine_step_are_used_trained_and_saved(kit_run):
    from safetensors.torch import load_file

    run, _, workdir = kit_run
    ids = torch.arange(1, 13).view(2, 6)
    with torch.no_grad(), run.experts.forward_context(ForwardContext()) as context:
        run.model.base_model(input_ids=ids)
    for routing in context.routings.values():
        assert routing.experts[:, 0].tolist() == [t % 4 for t in range(12)]
    adapter = load_file(workdir / "runs" / "micro" / "adapter.safetensors")
    scales = [v for k, v in adapter.items() if k.startswith("combines.") and k.endswith(".scale")]
    assert len(scales) == 2 and all(float(s) != 0.0 for s in scales)  # trained, saved with the adapter


def dense_layer(kit, combine="scaled", router="by_position"):
    from test_exactness import GatedMLP

    from srde_core.model.layer import PROJECTIONS, SRDEMLP

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = GatedMLP(12, 20).requires_grad_(False).double()
    delta = resolve_component(kit, "delta", "masked_dense").build()
    banks = {n: delta.make_bank(getattr(base, n).weight, 4, generator) for n in PROJECTIONS}
    router_module = resolve_component(kit, "router", router).build().make_router(12, 4, 1, generator)
    combine_step = resolve_component(kit, "combine", combine).build().make_combine(12, 4, 1, generator)
    mlp = SRDEMLP(base, router_module, banks, combine_step).double()
    with torch.no_grad():
        for bank in banks.values():
            bank.delta.normal_(0.0, 0.3, generator=generator)
        combine_step.scale.fill_(0.7)
    return mlp


def test_router_combine_and_bank_match_the_dense_reference(kit):
    from srde_core.model.reference import dense_reference

    mlp = dense_layer(kit)
    x = torch.randn(10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for forward in (lambda: mlp(x), lambda: dense_reference(mlp, x)):
        mlp.zero_grad()
        y = forward()
        y.pow(2).sum().backward()
        grads.append((y.detach(), {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-9, atol=1e-11, msg=name)


def test_a_bank_that_changes_its_active_fraction_computes_with_the_entries_it_keeps(kit):
    from srde_core.model.reference import dense_reference

    mlp = dense_layer(kit)
    x = torch.randn(10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = mlp(x).detach()
    for bank in mlp.banks.values():
        bank.set_active_fraction(0.25)
        assert bank.active_fraction == pytest.approx(0.25, abs=0.01)
    quarter = mlp(x).detach()
    assert not torch.allclose(full, quarter)
    torch.testing.assert_close(quarter, dense_reference(mlp, x).detach(), rtol=1e-10, atol=1e-12)
    for bank in mlp.banks.values():
        bank.set_active_fraction(1.0)
    torch.testing.assert_close(mlp(x).detach(), full)
