"""The built-in router and combine steps against the dense reference, through the public contracts.

Components come from the registries (as a recipe builds them): the ``sparse`` delta, the ``topk``
router with each gate normalisation, and every registered combine step. Checked here:

(a) output and gradients equal :func:`srde_core.model.reference.dense_reference` (float64 and float32);
(b) at top_k = 1 the default router learns from the task loss alone, ``softmax_topk`` does not;
(c) forced experts from the :class:`ForwardContext` route each token where they say, exactly;
(d) a bank that moves its entries (``set_positions``) takes its optimiser state along in a
    :class:`TorchSession` (same count: in place; another count: new parameters).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srde_core.model.attach import attach_srde
from srde_core.model.context import ForwardContext
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.model.reference import dense_reference
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component
from srde_core.registry import ComponentChoice
from srde_core.testing import outputs_and_grads

PLUGINS = load_plugins()
REGISTRIES = PLUGINS.registries
GATES = ["auto", "softmax_topk", "softmax"]
COMBINES = REGISTRIES["combine"].names()
HIDDEN, INTERMEDIATE, EXPERTS = 12, 20, 4


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=True)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def sparse_delta(density: float = 0.3, selector: str = "random"):
    """The registry's ``sparse`` delta type, its params (and nested selector) resolved as a recipe's."""
    component = REGISTRIES["delta"].get("sparse")
    choice = resolve_component(PLUGINS, "delta", {"name": "sparse", "density": density, "selector": selector})
    assert isinstance(choice, ComponentChoice) and choice.component is component
    return choice.build()


def topk(gate: str | None = None):
    spec = {"name": "topk"} if gate is None else {"name": "topk", "gate": gate}
    return resolve_component(PLUGINS, "router", spec).build()


def build_layer(top_k: int, gate: str | None = "auto", combine: str = "weighted_sum", *, seed: int = 0,
                trained: bool = True) -> SRDEMLP:
    """A frozen random MLP with sparse banks, the ``topk`` router and a combine step, all from the
    registries; ``trained`` draws every trainable tensor (bank values and importance, router gate,
    combine parameters) at random."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = GatedMLP(HIDDEN, INTERMEDIATE).requires_grad_(False)
    delta = sparse_delta()
    banks = {name: delta.make_bank(getattr(base, name).weight.detach(), EXPERTS, generator) for name in PROJECTIONS}
    router = topk(gate).make_router(HIDDEN, EXPERTS, top_k, generator)
    step = resolve_component(PLUGINS, "combine", combine).build().make_combine(HIDDEN, EXPERTS, top_k, generator)
    mlp = SRDEMLP(base, router, banks, step)
    if trained:
        with torch.no_grad():
            for bank in banks.values():
                bank.values.normal_(0.0, 0.5, generator=generator)
                bank.importance.normal_(0.0, 1.0, generator=generator)
            router.gate.weight.normal_(0.0, 0.5, generator=generator)
            for p in step.parameters():
                p.normal_(0.0, 0.3, generator=generator)
    return mlp


def assert_matches_reference(mlp: SRDEMLP, x: torch.Tensor, *, tol: float, context=None) -> dict:
    """Fast path == dense reference in the output and every gradient, to ``tol`` relative to the
    largest entry of each; returns the gradients."""
    y, grads = outputs_and_grads(mlp, lambda m, v: m(v), x, context)
    y_ref, grads_ref = outputs_and_grads(mlp, dense_reference, x, context)
    assert y.dtype == y_ref.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads[name], ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1e-30),
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    return grads


# ---- (a) gate normalisations and combine steps vs the dense reference ----------------------------------------


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_gate_normalisations_and_combine_steps_match_the_reference_float64(top_k, gate, combine):
    mlp = build_layer(top_k, gate, combine).double()
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = assert_matches_reference(mlp, x, tol=1e-10)
    # the comparison covers what trains: bank values and importance of each projection, the router
    for name in ("router.gate.weight", *(f"banks.{p}.{t}" for p in PROJECTIONS for t in ("values", "importance"))):
        assert name in grads
    for name, p in mlp.combine.named_parameters():
        assert torch.count_nonzero(grads[f"combine.{name}"]) > 0, name


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_gate_normalisations_and_combine_steps_match_the_reference_float32(top_k, gate, combine):
    mlp = build_layer(top_k, gate, combine)
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(mlp, x, tol=1e-5)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_the_gate_weights_are_the_documented_normalisation(top_k, gate):
    """What each normalisation means, written out from the router's logits."""
    mlp = build_layer(top_k, gate).double()
    x = torch.randn(9, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    routing = mlp.router(x)
    logits = x @ mlp.router.gate.weight.T
    chosen = logits.topk(top_k, dim=-1)
    assert torch.equal(routing.experts, chosen.indices)
    effective = {"auto": "softmax" if top_k == 1 else "softmax_topk"}.get(gate, gate)
    if effective == "softmax":
        expected = F.softmax(logits, -1).gather(1, chosen.indices)
    else:
        expected = F.softmax(chosen.values, -1)
    torch.testing.assert_close(routing.weights.double(), expected, rtol=1e-6, atol=1e-7)


# ---- (b) the top-1 router gradient from the task loss ---------------------------------------------------------


def router_grad_from_mse(gate: str | None) -> torch.Tensor:
    mlp = build_layer(1, gate)
    x = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(4))
    target = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(5))
    F.mse_loss(mlp(x), target).backward()  # the task loss alone: no router loss
    grad = mlp.router.gate.weight.grad
    return torch.zeros_like(mlp.router.gate.weight) if grad is None else grad


def router_grads_from_lm_loss(gate: str | None) -> list[torch.Tensor]:
    from srde_testkit import input_ids, perturb, tiny_model

    model = tiny_model("LlamaForCausalLM")
    router_spec = {"name": "topk"} if gate is None else {"name": "topk", "gate": gate}
    experts = attach_srde(
        model,
        layout=resolve_component(PLUGINS, "layout", {"name": "uniform", "num_experts": EXPERTS, "top_k": 1}).build(),
        delta_type=sparse_delta(0.2),
        router_type=resolve_component(PLUGINS, "router", router_spec).build(),
        combine_type=resolve_component(PLUGINS, "combine", "weighted_sum").build(),
        seed=0,
    )
    perturb(experts, seed=1, scale=0.3)  # trained deltas: with dW = 0 nothing depends on the router
    ids = input_ids(batch=2, length=9)
    with experts.forward_context(ForwardContext()) as context:
        loss = model(input_ids=ids, labels=ids).loss  # the LM loss alone
    loss.backward()
    assert all(r.top_k == 1 for r in context.ordered_routings())
    return [r.gate.weight.grad if r.gate.weight.grad is not None else torch.zeros_like(r.gate.weight)
            for r in experts.routers().values()]


def test_at_top_1_the_default_router_learns_from_the_task_loss():
    """The bug being fixed: at top_k = 1 the softmax over the one chosen logit is always 1, so the
    task loss gave the router no gradient. The default (``auto``) must use the full softmax there."""
    default = REGISTRIES["router"].get("topk").params()
    assert default.gate == "auto"
    assert torch.count_nonzero(router_grad_from_mse(None)) > 0
    assert all(torch.count_nonzero(g) > 0 for g in router_grads_from_lm_loss(None))
    # the same gradient as the full softmax's, which it is at k = 1
    torch.testing.assert_close(router_grad_from_mse(None), router_grad_from_mse("softmax"), rtol=0, atol=0)


def test_at_top_1_the_topk_softmax_gives_the_router_exactly_no_task_gradient():
    assert torch.count_nonzero(router_grad_from_mse("softmax_topk")) == 0
    assert all(torch.count_nonzero(g) == 0 for g in router_grads_from_lm_loss("softmax_topk"))


def test_at_top_2_the_topk_softmax_learns_from_the_task_loss():
    mlp = build_layer(2, "softmax_topk")
    x = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(6))
    mlp(x).pow(2).mean().backward()
    assert torch.count_nonzero(mlp.router.gate.weight.grad) > 0


# ---- (c) forced routing through the forward context ------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_forced_experts_route_each_token_to_the_given_expert(top_k):
    mlp = build_layer(top_k, "auto").double()
    x = torch.randn(3, 5, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(8)
    per_token = torch.stack([torch.randperm(EXPERTS, generator=generator)[:top_k] for _ in range(15)])
    per_example = torch.tensor([[3, 0], [1, 2], [2, 3]])[:, :top_k]
    cases = {
        "per token [T, k]": (per_token, per_token),
        "per example [B, k]": (per_example, per_example.repeat_interleave(5, dim=0)),
        "per layer mapping": ({0: per_token}, per_token),
    }
    if top_k == 1:
        cases["per token [T]"] = (per_token[:, 0], per_token)
    unforced = mlp.router(x.reshape(-1, HIDDEN)).experts
    assert not torch.equal(unforced, per_token)  # the forcing changes the decision
    for label, (forced, expected) in cases.items():
        context = ForwardContext(forced_experts=forced)
        with mlp.context.using(context), torch.no_grad():
            mlp(x)
        routing = context.routings[0]
        assert torch.equal(routing.experts, expected), label
        assert torch.equal(routing.weights, torch.full(expected.shape, 1.0 / top_k, dtype=routing.weights.dtype)), label
        # each token's output is the base plus exactly its forced experts' deltas
        assert_matches_reference(mlp, x, tol=1e-10, context=ForwardContext(forced_experts=forced))
    # written out for one token: W + mean of its forced experts' dense deltas
    t = 4
    context = ForwardContext(forced_experts=per_token)
    with mlp.context.using(context), torch.no_grad():
        y = mlp(x).reshape(-1, HIDDEN)[t]
        v = x.reshape(-1, HIDDEN)[t]

        def project(name, inp):
            linear = getattr(mlp.base, name)
            weight = linear.weight + sum(mlp.banks[name].delta_weight(int(e)) for e in per_token[t]) / top_k
            return F.linear(inp, weight, linear.bias)

        by_hand = project("down_proj", F.silu(project("gate_proj", v)) * project("up_proj", v))
    torch.testing.assert_close(y, by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("combine", COMBINES)
def test_forced_experts_survive_every_combine_step(combine):
    """A forced assignment (Phase 1 expert pre-training) sends each token to its given experts, whatever
    the combine step: a combine step may re-weight the forced experts, not route elsewhere."""
    mlp = build_layer(1, "auto", combine).double()
    x = torch.randn(8, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    forced = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    context = ForwardContext(forced_experts=forced)
    with mlp.context.using(context), torch.no_grad():
        mlp(x)
    assert torch.equal(context.routings[0].experts, forced[:, None]), f"combine step '{combine}' re-routes forced tokens"
    assert_matches_reference(mlp, x, tol=1e-10, context=ForwardContext(forced_experts=forced))


def test_forced_experts_out_of_range_are_refused():
    mlp = build_layer(1)
    with mlp.context.using(ForwardContext(forced_experts=torch.full((6,), EXPERTS))), pytest.raises(ValueError, match="forced"):
        mlp(torch.randn(6, HIDDEN))


# ---- (d) optimiser state follows moved positions ---------------------------------------------------------------


def session_for(mlp: SRDEMLP):
    from srde_core.train.driver import TrainingTarget
    from srde_core.train.engine import OptimizerSpec, TorchSession

    target = TrainingTarget(
        model=mlp,
        parameters=[p for p in mlp.parameters() if p.requires_grad],
        get_state=mlp.state_dict,
        set_state=mlp.load_state_dict,
    )
    spec = OptimizerSpec(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), max_grad_norm=1.0,
                         schedule=lambda step: 1.0, precision="fp32")
    return TorchSession(target, spec, torch.device("cpu"))


def train_steps(mlp: SRDEMLP, session, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(20, HIDDEN, generator=generator)
        target = torch.randn(20, HIDDEN, generator=generator)
        session.backward(F.mse_loss(mlp(x), target))
        session.step()


def new_positions(bank, count: int, seed: int) -> torch.Tensor:
    """Per expert: every other old position kept, the rest fresh positions it did not own."""
    generator = torch.Generator().manual_seed(seed)
    numel = bank.out_features * bank.in_features
    rows = []
    for e in range(bank.num_experts):
        keep = bank.entry_positions()[e][::2][:count]
        free = torch.ones(numel, dtype=torch.bool)
        free[bank.entry_positions()[e]] = False
        candidates = free.nonzero().flatten()
        fresh = candidates[torch.randperm(len(candidates), generator=generator)[: count - len(keep)]]
        rows.append(torch.sort(torch.cat([keep, fresh])).values)
    return torch.stack(rows)


@pytest.mark.parametrize("change", [0, 5, -3], ids=["same-count", "grow", "shrink"])
def test_optimizer_state_follows_moved_positions(change):
    mlp = build_layer(2, trained=False)
    session = session_for(mlp)
    bank = mlp.banks["up_proj"]
    bank.add_remap_listener(session.remap)
    train_steps(mlp, session, 3, seed=10)

    old_positions = bank.entry_positions().clone()
    old_params = {name: getattr(bank, name) for name in ("values", "importance")}
    old_state = {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in session.optimizer.state[p].items()}
                 for name, p in old_params.items()}
    old_data = {name: p.detach().clone() for name, p in old_params.items()}
    for state in old_state.values():
        assert torch.count_nonzero(state["exp_avg"]) > 0 and torch.count_nonzero(state["exp_avg_sq"]) > 0

    positions = new_positions(bank, bank.count + change, seed=11)
    bank.set_positions(positions)
    assert torch.equal(bank.entry_positions(), positions)

    optimised = [p for group in session.optimizer.param_groups for p in group["params"]]
    for name, old in old_params.items():
        new = getattr(bank, name)
        assert new.shape == positions.shape
        assert (new is old) == (change == 0)  # in place at the same count, replaced otherwise
        assert any(p is new for p in optimised) and (change == 0 or not any(p is old for p in optimised))
        assert any(p is new for p in session.parameters)
        if new is not old:
            assert old not in session.optimizer.state
        state = session.optimizer.state[new]
        assert torch.equal(torch.as_tensor(state["step"]), torch.as_tensor(old_state[name]["step"]))
        for e in range(bank.num_experts):
            slot_of_old = {int(p): j for j, p in enumerate(old_positions[e])}
            for j, p in enumerate(positions[e].tolist()):
                i = slot_of_old.get(p)
                for key in ("exp_avg", "exp_avg_sq"):
                    want = old_state[name][key][e, i] if i is not None else torch.zeros(())
                    assert torch.equal(state[key][e, j], want), (name, key, e, p)
                fresh_value = 0.0 if name == "values" else bank.init_importance
                want = old_data[name][e, i] if i is not None else torch.tensor(fresh_value)
                assert torch.equal(new.detach()[e, j], want), (name, e, p)

    # training goes on with the moved state: the new entries train, the step counter advances
    before = {name: getattr(bank, name).detach().clone() for name in old_params}
    train_steps(mlp, session, 1, seed=12)
    for name in old_params:
        p = getattr(bank, name)
        assert not torch.equal(p.detach(), before[name])
        assert int(torch.as_tensor(session.optimizer.state[p]["step"])) == int(torch.as_tensor(old_state[name]["step"])) + 1
    x = torch.randn(13, HIDDEN, generator=torch.Generator().manual_seed(13))
    assert_matches_reference(mlp, x, tol=1e-5)  # still exact after the move
