"""Expert fusion (`srde_plugins.routing` combine steps): exact against the dense reference, trainable,
and an untrained gate is the plain weighted sum."""

from __future__ import annotations

import pytest
import torch
from srde_testkit import make_router
from test_exactness import GatedMLP, assert_matches

from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component

PLUGINS = load_plugins()
COMBINES = PLUGINS.registries["combine"].names()


def layer(combine: str, *, hidden=16, intermediate=28, experts=4, top_k=2, seed=0, dtype=torch.float32) -> SRDEMLP:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = GatedMLP(hidden, intermediate).requires_grad_(False)
    delta = resolve_component(PLUGINS, "delta", {"name": "sparse", "density": 0.3, "selector": "random"}).build()
    banks = {n: delta.make_bank(getattr(base, n).weight.detach(), experts, generator) for n in PROJECTIONS}
    step = resolve_component(PLUGINS, "combine", combine).build().make_combine(hidden, experts, top_k, generator)
    mlp = SRDEMLP(base, make_router(hidden, experts, top_k, seed), banks, step)
    with torch.no_grad():
        for p in mlp.parameters():
            if p.requires_grad and p is not mlp.router.gate.weight:
                p.normal_(0.0, 0.3, generator=generator)
    return mlp.to(dtype)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_combine_step_matches_the_dense_reference_float32(combine, top_k):
    mlp = layer(combine, top_k=top_k)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combine", COMBINES)
def test_combine_step_matches_the_dense_reference_float64(combine):
    mlp = layer(combine, dtype=torch.float64)
    x = torch.randn(13, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_matches(mlp, x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("combine", [c for c in COMBINES if c != "weighted_sum"])
def test_fusion_changes_the_output_and_its_parameters_train(combine):
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(3))
    fused, plain = layer(combine), layer("weighted_sum")
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("combine.")})
    assert not torch.allclose(fused(x), plain(x))
    fused(x).pow(2).sum().backward()
    for name, p in fused.combine.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_an_untrained_gate_is_exactly_the_weighted_sum():
    gated = layer("gated")
    with torch.no_grad():
        for p in gated.combine.parameters():
            p.zero_()
    plain = layer("weighted_sum")
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("combine.")})
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(gated(x), plain(x))


def test_soft_merge_uses_every_expert_with_its_probability():
    mlp = layer("soft_merge", experts=5, top_k=1)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    routing = mlp.route(x, __import__("srde_core.model.context", fromlist=["ForwardContext"]).ForwardContext())
    assert routing.experts.shape == (7, 5)
    torch.testing.assert_close(routing.weights.sum(1), torch.ones(7))


@pytest.mark.parametrize("combine", [c for c in COMBINES if c != "weighted_sum"])
def test_gradients_of_the_combine_parameters_match_the_reference(combine):
    from srde_core.model.reference import dense_reference

    mlp = layer(combine, dtype=torch.float64)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = []
    for forward in (lambda: mlp(x), lambda: dense_reference(mlp, x)):
        mlp.zero_grad()
        (forward() * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in mlp.combine.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-11)


def _router_loss(mlp, x, direction):
    return (mlp(x) * direction).sum()


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize(("top_k", "gate"), [(1, "auto"), (2, "auto"), (2, "softmax")])
def test_the_router_gets_the_task_gradient_through_every_combine_step(combine, top_k, gate):
    """Every combine step weights the experts by the router's probabilities (the full softmax, or the
    gate over the chosen k), so the task loss reaches the router's parameters: nonzero, and equal to a
    central finite difference along a random direction (a probability detached anywhere on the way gives
    zero, or a gradient that disagrees). The router itself computes in float32, hence the step size."""
    from srde_testkit import make_router as router_of

    mlp = layer(combine, top_k=top_k, dtype=torch.float64)
    mlp.router = router_of(16, 4, top_k, 0, gate=gate).double()
    with torch.no_grad():
        mlp.router.gate.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(8))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    direction = torch.linspace(-1, 1, 16, dtype=torch.float64)
    weight = mlp.router.gate.weight
    mlp.zero_grad()
    _router_loss(mlp, x, direction).backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) > 0, combine
    step = torch.randn(weight.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    eps = 1e-3  # the router computes in float32: a smaller step drowns in its rounding
    with torch.no_grad():
        choice = mlp.router(x).experts
        weight += eps * step
        plus = _router_loss(mlp, x, direction)
        assert torch.equal(mlp.router(x).experts, choice)  # the step is too small to change a choice
        weight -= 2 * eps * step
        minus = _router_loss(mlp, x, direction)
        assert torch.equal(mlp.router(x).experts, choice)
        weight += eps * step
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((weight.grad * step).sum())
    assert abs(numeric) > 1e-6
    assert analytic == pytest.approx(numeric, rel=2e-3)


def test_soft_merge_routing_statistics_and_load_balance_count_the_routers_top_k():
    """soft_merge applies every expert, but what the router chose is its top-k: the load balance
    (E * sum f_e P_e with f_e the top-k share), its gradient, the max load and srde eval's expert x
    domain counts come from that choice, as with weighted_sum on the same router."""
    from srde_core.evaluate.routing import RoutingCounter
    from srde_core.model.context import ForwardContext
    from srde_core.train.losses import LossInputs
    from srde_core.train.objective import router_statistics

    load_balance = resolve_component(PLUGINS, "loss", "load_balance").build()
    x = torch.randn(2 * 9, 16, generator=torch.Generator().manual_seed(11))
    results = {}
    for combine in ("soft_merge", "weighted_sum"):
        mlp = layer(combine, experts=4, top_k=1)
        with torch.no_grad():  # a router with a clear favourite: expert 0 takes most tokens
            mlp.router.gate.weight[0] += 0.5 * x.mean(0) / x.mean(0).norm()
        context = ForwardContext()
        routing = mlp.route(x, context)
        top = torch.topk(routing.logits, 1, dim=1).indices
        assert torch.equal(routing.routed, top)
        batch = {"attention_mask": torch.ones(2, 9, dtype=torch.long), "domain_ids": torch.tensor([0, 1])}
        inputs = LossInputs(hidden=x, lm_head=None, labels=torch.zeros(2, 9), batch=batch, routings=[routing])
        loss = load_balance(inputs)
        (grad,) = torch.autograd.grad(loss, mlp.router.gate.weight)
        counter = RoutingCounter([0], num_domains=2)
        counter.observe(batch, ForwardContext(routings={0: routing}))
        results[combine] = (float(loss.detach()), grad, router_statistics([routing], batch["attention_mask"]), counter.counts[0])
    merged, plain = results["soft_merge"], results["weighted_sum"]
    assert merged[0] == pytest.approx(plain[0]) and merged[0] > 1.05  # skewed: above the balanced 1.0
    assert torch.count_nonzero(merged[1]) > 0 and torch.allclose(merged[1], plain[1])
    assert merged[2] == plain[2] and merged[2]["router_max_load"] > 0.25
    assert torch.equal(merged[3], plain[3]) and int(merged[3].sum()) == 18  # one slot per token (k = 1)
