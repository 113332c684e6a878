"""Every core contract, exercised through its public surface by one test plugin
(`tests/contract_plugin.py`, loaded in process): a new component kind used from another component's
params, a router, a combine step with a learned parameter, a sampler, an engine, a scalar schedule
and a delta bank that changes its active fraction.

The run tests pick every one of them by name in the micro recipe (`--set` overrides) and check
their effects on the finished run; the layer tests check router, combine step and bank against the
dense reference (:func:`srde_core.model.reference.dense_reference`).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import contract_plugin
from contract_plugin import PLUGIN
from srde_core.errors import PluginError, RecipeError
from srde_core.model.combine import WeightedSum
from srde_core.model.context import ForwardContext
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.model.reference import dense_reference
from srde_core.plugins import load_plugins, provided_by
from srde_core.recipe import load_recipe, resolve_component
from srde_core.testing import outputs_and_grads

SALT = 3
SAMPLER_START = 5
RECORD_EVERY = 2
WEIGHTS, BOUNDARIES = [0.5, 0.25, 0.0], [2, 4]  # load_balance weight: 0.5 at steps 0-1, 0.25 at 2-3, 0 after

OVERRIDES = [
    "engine=counting",
    f'srde.router={{ name = "position_hash", salt = {SALT} }}',
    "srde.combine=token_gate",
    "srde.delta=masked_dense",
    f'phases.experts.trainer={{ name = "probed_joint", probe = {{ name = "recorder", every = {RECORD_EVERY} }} }}',
    f'phases.experts.sampler={{ name = "sequential", start = {SAMPLER_START} }}',
    'phases.experts.losses=["lm", { name = "load_balance", weight = { name = "step", '
    f"values = {WEIGHTS}, boundaries = {BOUNDARIES} }} }}]",
    "phases.experts.log_every=1",
]


@pytest.fixture(scope="module")
def kit():
    plugins = load_plugins(extra=[(PLUGIN, contract_plugin)])
    assert not plugins.broken, plugins.broken_note()
    return plugins


@pytest.fixture(scope="module")
def micro(kit):
    from conftest import RECIPES

    return RECIPES / "micro.toml"


# ---- kinds and their contracts ---------------------------------------------------------------------------


def test_the_plugin_declares_a_kind_and_registers_a_component_of_every_kind(kit):
    assert "probe" in kit.registries
    spec = kit.registries["probe"].spec
    assert spec.provider == PLUGIN and spec.contract is contract_plugin.Probe
    assert set(provided_by(kit, PLUGIN)) == {
        ("kind", "probe"),
        ("probe", "recorder"), ("probe", "impostor"), ("trainer", "probed_joint"),
        ("router", "position_hash"), ("router", "not_a_router"), ("combine", "token_gate"),
        ("sampler", "sequential"), ("engine", "counting"), ("schedule", "step"), ("delta", "masked_dense"),
    }
    # the core's own components are still there, next to the plugin's
    assert {"topk", "position_hash"} <= set(kit.registries["router"].names())


def test_srde_list_plugins_lists_the_kind_and_its_components(kit, monkeypatch, capsys):
    import srde_core.plugins
    from srde_core.cli import main

    monkeypatch.setattr(srde_core.plugins, "load_plugins", lambda **_: kit)  # the CLI loads entry points only
    assert main(["list-plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    kinds = {k["kind"]: k for k in listed["kinds"]}
    assert kinds["probe"]["plugin"] == PLUGIN and kinds["probe"]["contract"] == "contract_plugin:Probe"
    ours = {(c["kind"], c["name"]) for c in listed["components"] if c["plugin"] == PLUGIN}
    assert ("probe", "recorder") in ours and ("router", "position_hash") in ours and len(ours) == 10
    (entry,) = [p for p in listed["plugins"] if p["name"] == PLUGIN]
    assert entry["error"] is None and {"kind": "kind", "name": "probe"} in entry["provides"]


def test_a_kinds_contract_is_enforced_when_a_component_is_built(kit):
    probe = resolve_component(kit, "probe", {"name": "recorder", "every": 3}).build()
    assert isinstance(probe, contract_plugin.Probe) and probe.every == 3
    with pytest.raises(PluginError, match=r"probe 'impostor' \(plugin 'contract-test'\) built Impostor, "
                                          r"not a contract_plugin\.Probe"):
        resolve_component(kit, "probe", "impostor").build()
    # the core's kinds are declared the same way and enforced the same way
    with pytest.raises(PluginError, match=r"router 'not_a_router' \(plugin 'contract-test'\) built Impostor, "
                                          r"not a srde_core\.model\.routing\.RouterType"):
        resolve_component(kit, "router", "not_a_router").build()


def test_a_component_field_of_the_new_kind_is_resolved_and_validated_like_any_recipe_slot(kit, micro):
    recipe = load_recipe(micro, kit, OVERRIDES)
    experts = recipe.phases[1]
    assert experts.trainer.name == "probed_joint"
    assert experts.trainer.params.probe.kind == "probe" and experts.trainer.params.probe.name == "recorder"
    assert recipe.resolved["phases"][1]["trainer"]["probe"] == {"name": "recorder", "every": RECORD_EVERY}
    # left out, the field takes the slot's default
    default = load_recipe(micro, kit, ['phases.experts.trainer="probed_joint"'])
    assert default.phases[1].trainer.params.probe.name == "recorder"
    assert default.phases[1].trainer.params.probe.params.every == 1

    bad = {
        'phases.experts.trainer={ name = "probed_joint", probe = "recordr" }': r"unknown probe 'recordr'.*recorder",
        'phases.experts.trainer={ name = "probed_joint", probe = { name = "recorder", every = 0 } }': r"every",
        'phases.experts.losses=["lm", { name = "load_balance", weight = { name = "step", values = [1.0] , '
        "boundaries = [2] } }]": r"one more value than boundaries",
        'srde.router={ name = "position_hash", salt = -1 }': r"salt",
    }
    for override, message in bad.items():
        with pytest.raises(RecipeError, match=message):
            load_recipe(micro, kit, [override])


# ---- one run that picks every component by name ------------------------------------------------------------


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory, kit, micro):
    from conftest import run_recipe_in

    workdir = tmp_path_factory.mktemp("contracts")
    run = run_recipe_in(workdir, micro, kit, OVERRIDES)
    run_dir = workdir / "runs" / "micro"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run, [m for m in metrics if m["phase"] == "experts"], run_dir


def test_the_engine_is_the_recipes_choice_and_runs_every_phase(kit_run):
    run, _, _ = kit_run
    assert isinstance(run.engine, contract_plugin.CountingEngine)
    assert run.engine.starts == len(run.recipe.phases) == 2  # base_pretrain and probed_joint
    assert run.engine.steps == sum(phase.steps for phase in run.recipe.phases) == 12


def test_the_trainer_builds_the_probe_its_params_name_and_shows_it_every_step(kit_run):
    run, metrics, _ = kit_run
    probe = run.plugin_state(contract_plugin.PROBE_STATE, lambda: None)
    assert isinstance(probe, contract_plugin.RecorderProbe) and probe.every == RECORD_EVERY
    assert probe.steps == list(range(0, run.recipe.phases[1].steps, RECORD_EVERY)) == [0, 2, 4]
    logged = {m["step"] - 1: m["loss"] for m in metrics}  # metrics count steps from 1
    for step in probe.steps:
        assert probe.losses[step] == pytest.approx(logged[step], rel=1e-6)


def test_the_sampler_chooses_the_batches_the_model_trains_on(kit_run):
    from srde_core.data.collate import collate

    run, metrics, _ = kit_run
    probe = run.plugin_state(contract_plugin.PROBE_STATE, lambda: None)
    train, batch_size = run.data.train, run.recipe.phases[1].batch_size
    n = len(train)
    for step in probe.steps:
        (seen,) = probe.batches[step]  # grad_accum = 1: one micro-batch per step
        rows = [(SAMPLER_START + step * batch_size + i) % n for i in range(batch_size)]
        expected = collate(train.select(rows), pad_id=run.tokenizer.pad_id)["input_ids"]
        assert torch.equal(seen, expected), f"step {step}"
    assert [m["sequential_first"] for m in metrics] == [
        float((SAMPLER_START + s * batch_size) % n) for s in range(len(metrics))
    ]


def test_a_schedule_drives_a_loss_weight(kit_run):
    run, metrics, _ = kit_run
    assert [m["step"] for m in metrics] == list(range(1, 7))
    expected = [WEIGHTS[sum(s >= b for b in BOUNDARIES)] for s in range(6)]
    assert expected == [0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    assert [m["load_balance_weight"] for m in metrics] == expected
    assert all("load_balance" in m for m in metrics)


def _expected_experts(tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    rows = []
    for t in range(tokens):
        h = ((t + SALT) * 2654435761 % 2**32) >> 16
        rows.append([(h + j) % num_experts for j in range(top_k)])
    return torch.tensor(rows)


def test_the_router_routes_every_layer_and_its_gate_trained(kit_run):
    from safetensors.torch import load_file

    run, _, run_dir = kit_run
    experts = run.experts
    layers = experts.layers
    assert layers and all(isinstance(mlp.router, contract_plugin.PositionHashRouter) for mlp in layers.values())
    ids = torch.arange(1, 15).view(2, 7)
    with torch.no_grad(), experts.forward_context(ForwardContext()) as context:
        run.model.base_model(input_ids=ids)
    assert sorted(context.routings) == sorted(layers)
    for index, routing in context.routings.items():
        plan = next(p for p in experts.plans if p.layer == index)
        assert torch.equal(routing.experts, _expected_experts(14, plan.num_experts, plan.top_k))
    # the gate trained: the recipe's experts attached afresh (same seed) start elsewhere than saved
    from srde_core.model.build import attach_recipe_experts, build_base_model

    adapter = load_file(run_dir / "adapter.safetensors")
    initial = attach_recipe_experts(build_base_model(run), run.recipe).routers()
    assert sorted(initial) == sorted(layers)
    for index, router in initial.items():
        assert isinstance(router, contract_plugin.PositionHashRouter) and router.salt == SALT
        saved = adapter[f"routers.{index}.gate.weight"]
        assert saved.shape == router.gate.weight.shape
        assert not torch.allclose(saved, router.gate.weight.detach(), atol=1e-6)


def test_the_combine_gate_trained_and_is_saved_with_the_adapter(kit_run):
    from safetensors import safe_open

    run, _, run_dir = kit_run
    with safe_open(str(run_dir / "adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
        structure = json.loads(f.metadata()["structure"])
        saved = {k: f.get_tensor(k) for k in keys if k.startswith("combines.")}
    layers = run.experts.layers
    assert set(saved) == {f"combines.{i}.v" for i in layers}
    for i, mlp in layers.items():
        assert isinstance(mlp.combine, contract_plugin.TokenGate)
        assert torch.count_nonzero(saved[f"combines.{i}.v"]) > 0  # started at zero
        assert torch.equal(saved[f"combines.{i}.v"], mlp.combine.v.detach())
    assert structure["components"]["combine"]["name"] == "token_gate"
    assert structure["components"]["router"] == {"name": "position_hash", "params": {"salt": SALT, "init_std": 0.1}}
    assert structure["components"]["delta"]["name"] == "masked_dense"
    # the masked dense banks trained too (and their mask buffer is saved)
    deltas = [k for k in keys if k.startswith("banks.") and k.endswith(".delta")]
    assert deltas and all(k[: -len("delta")] + "mask" in keys for k in deltas)


# ---- the same components against the dense reference --------------------------------------------------------


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=True)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


HIDDEN, INTERMEDIATE, EXPERTS = 12, 20, 4


def plugin_layer(kit, top_k: int = 2, dtype=torch.float64) -> SRDEMLP:
    """An SRDE layer of the plugin's router, combine step and bank, every trainable tensor random."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = GatedMLP(HIDDEN, INTERMEDIATE).requires_grad_(False)
    delta = resolve_component(kit, "delta", "masked_dense").build()
    banks = {name: delta.make_bank(getattr(base, name).weight, EXPERTS, generator) for name in PROJECTIONS}
    router = resolve_component(kit, "router", {"name": "position_hash", "salt": SALT}).build()
    combine = resolve_component(kit, "combine", "token_gate").build()
    mlp = SRDEMLP(
        base, router.make_router(HIDDEN, EXPERTS, top_k, generator), banks,
        combine.make_combine(HIDDEN, EXPERTS, top_k, generator),
    ).to(dtype)
    with torch.no_grad():
        for bank in banks.values():
            assert torch.count_nonzero(bank.delta_weight(0)) == 0  # a bank starts at dW = 0
            bank.delta.normal_(0.0, 0.3, generator=generator)
        mlp.combine.v.normal_(0.0, 0.5, generator=generator)
    return mlp


def assert_matches_reference(mlp, x, *, rtol, atol, context=None, unreached=()):
    """Output and the gradients of the input and of every trainable tensor agree; every gradient is
    non-zero but those of ``unreached``."""
    y, grads = outputs_and_grads(mlp, lambda m, v: m(v), x, context)
    y_ref, grads_ref = outputs_and_grads(mlp, dense_reference, x, context)
    torch.testing.assert_close(y, y_ref.to(y.dtype), rtol=rtol, atol=atol * y_ref.abs().max().item())
    assert grads.keys() == grads_ref.keys()
    assert {"router.gate.weight", "combine.v", "banks.up_proj.delta"} <= grads.keys()
    for name, ref in grads_ref.items():
        assert (torch.count_nonzero(ref) > 0) == (name not in unreached), name
        torch.testing.assert_close(grads[name], ref.to(grads[name].dtype), rtol=rtol,
                                   atol=atol * ref.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_combine_and_bank_match_the_dense_reference(kit, top_k):
    mlp = plugin_layer(kit, top_k)
    x = torch.randn(3, 5, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_matches_reference(mlp, x, rtol=1e-10, atol=1e-12)
    mlp32 = plugin_layer(kit, top_k, torch.float32)
    assert_matches_reference(mlp32, x.float(), rtol=1e-5, atol=1e-6)
    # the layer really routes by position and the gate really scales the weights
    context = ForwardContext()
    with torch.no_grad():
        mlp.route(x.reshape(-1, HIDDEN), context)
    routing = context.routings[0]
    assert torch.equal(routing.experts, _expected_experts(15, EXPERTS, top_k))
    flat = x.reshape(-1, HIDDEN)
    probs = torch.softmax(flat @ mlp.router.gate.weight.T, -1)
    expected = probs.gather(1, routing.experts) * 2 * torch.sigmoid(flat @ mlp.combine.v)[:, None]
    torch.testing.assert_close(routing.weights, expected, rtol=1e-12, atol=1e-14)


def test_an_untrained_token_gate_is_the_plain_weighted_sum(kit):
    mlp = plugin_layer(kit)
    x = torch.randn(9, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mlp.combine.v.zero_()
        gated = mlp(x)
        mlp.combine = WeightedSum()  # the default combine step
        plain = mlp(x)
    assert torch.equal(gated, plain)


def test_forced_experts_override_the_plugin_router(kit):
    mlp = plugin_layer(kit, top_k=2)
    x = torch.randn(2, 4, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    forced = torch.tensor([[3, 1], [0, 2]])  # per example: both rows of tokens of example b get forced[b]
    context = ForwardContext(forced_experts=forced)
    with mlp.context.using(context):
        mlp(x)
    routing = context.routings[0]
    assert torch.equal(routing.experts, forced.repeat_interleave(4, dim=0))
    # equal weights, kept as they are: a forced assignment skips the combine step
    torch.testing.assert_close(routing.weights, torch.full((8, 2), 0.5, dtype=routing.weights.dtype))
    # forced weights are constants and skip the combine step: neither the router gate nor the combine gate learns here
    assert_matches_reference(mlp, x, rtol=1e-10, atol=1e-12, context=ForwardContext(forced_experts=forced),
                             unreached={"router.gate.weight", "combine.v"})


def test_a_bank_that_changes_its_active_fraction_computes_with_the_entries_it_keeps(kit):
    mlp = plugin_layer(kit)
    x = torch.randn(14, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = mlp(x)
    assert all(bank.active_fraction == 1.0 for bank in mlp.banks.values())

    # what a quarter must compute, built by hand: a copy whose deltas keep their largest quarter
    by_hand = copy.deepcopy(mlp)
    with torch.no_grad():
        for bank in by_hand.banks.values():
            flat = bank.delta.reshape(EXPERTS, -1)
            keep = round(0.25 * flat.shape[1])
            threshold = flat.abs().sort(dim=1, descending=True).values[:, keep - 1 : keep]
            flat.mul_((flat.abs() >= threshold).to(flat.dtype))
        expected = by_hand(x)

    for bank in mlp.banks.values():
        bank.set_active_fraction(0.25)
        numel = bank.out_features * bank.in_features
        assert bank.active_fraction == pytest.approx(round(0.25 * numel) / numel)
    with torch.no_grad():
        quarter = mlp(x)
    assert not torch.allclose(quarter, full)
    torch.testing.assert_close(quarter, expected, rtol=1e-12, atol=1e-12)
    assert_matches_reference(mlp, x, rtol=1e-10, atol=1e-12)
    # masked entries get no gradient; kept ones do
    mlp.zero_grad(set_to_none=True)
    mlp(x).pow(2).sum().backward()
    for bank in mlp.banks.values():
        masked = bank.mask == 0
        assert torch.count_nonzero(bank.delta.grad[masked]) == 0 and torch.count_nonzero(bank.delta.grad[~masked]) > 0

    for bank in mlp.banks.values():
        bank.set_active_fraction(1.0)
        assert bank.active_fraction == 1.0
    with torch.no_grad():
        assert torch.equal(mlp(x), full)  # masked entries kept their values
    with pytest.raises(ValueError, match="fraction"):
        next(iter(mlp.banks.values())).set_active_fraction(0.0)
