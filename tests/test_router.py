"""The per-token `topk` router: top-k, gate normalisations, grouping by expert, routing records."""

from __future__ import annotations

import pytest
import torch
from srde_testkit import make_router as kit_router
from torch import nn

from srde_core.model.context import ForwardContext
from srde_core.model.layer import SRDEMLP
from srde_core.model.routing import Router, Routing
from srde_plugins.routing.topk import TopKRouter


def make_router(hidden=16, experts=6, top_k=2, seed=0, gate="auto") -> Router:
    return kit_router(hidden, experts, top_k, seed, gate=gate)


def tokens(n=25, hidden=16, seed=1) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_top_k_picks_the_largest_logits(top_k):
    router = make_router(top_k=top_k)
    routing = router(tokens())
    assert routing.experts.shape == (25, top_k) and routing.top_k == top_k
    chosen = torch.gather(routing.logits, 1, routing.experts)
    others = routing.logits.clone()
    others.scatter_(1, routing.experts, float("-inf"))
    assert bool((chosen.min(1).values >= others.max(1).values).all())
    assert bool((routing.experts.sort(1).values[:, 1:] != routing.experts.sort(1).values[:, :-1]).all())


def test_weights_are_a_softmax_over_the_chosen_k():
    routing = make_router(top_k=3)(tokens())
    torch.testing.assert_close(routing.weights.sum(1), torch.ones(25))
    chosen = torch.gather(routing.logits, 1, routing.experts)
    torch.testing.assert_close(routing.weights, torch.softmax(chosen, dim=1))
    torch.testing.assert_close(routing.probs, torch.softmax(routing.logits, dim=1))


def test_softmax_topk_at_top_1_weight_is_one():
    routing = make_router(top_k=1, gate="softmax_topk")(tokens())
    assert torch.equal(routing.weights, torch.ones(25, 1))


@pytest.mark.parametrize("top_k", [1, 3])
def test_softmax_gate_is_the_full_softmax_probability_of_the_chosen(top_k):
    routing = make_router(top_k=top_k, gate="softmax")(tokens())
    torch.testing.assert_close(routing.weights, torch.gather(torch.softmax(routing.logits, 1), 1, routing.experts))
    assert bool((routing.weights.sum(1) < 1).all())


@pytest.mark.parametrize(("top_k", "expected"), [(1, "softmax"), (2, "softmax_topk"), (6, "softmax_topk")])
def test_auto_gate_is_softmax_at_top_1_and_softmax_over_the_chosen_otherwise(top_k, expected):
    assert make_router(top_k=top_k).normalisation == expected


def test_invalid_top_k_and_gate():
    with pytest.raises(ValueError):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError):
        TopKRouter(8, 4, 0)
    with pytest.raises(ValueError, match="gate"):
        TopKRouter(8, 4, 2, gate="sparsemax")


def test_groups_list_every_slot_once_by_expert():
    routing = make_router(experts=5, top_k=2)(tokens(n=30))
    groups = routing.groups()
    assert groups.offsets[0] == 0 and groups.offsets[-1] == 60
    assert sum(groups.counts) == 60
    seen = []
    for e in range(5):
        toks, weights = groups.expert(e)
        assert len(toks) == groups.counts[e]
        for t, w in zip(toks.tolist(), weights.tolist()):
            slot = routing.experts[t].tolist().index(e)
            assert w == routing.weights[t, slot].item()
            seen.append((t, e))
        assert toks.tolist() == sorted(toks.tolist())  # token order is kept within an expert
    assert sorted(seen) == sorted((t, int(e)) for t in range(30) for e in routing.experts[t])


def test_groups_with_experts_that_get_no_token():
    experts = torch.tensor([[3, 0], [0, 3], [3, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    routing = Routing(experts, weights, torch.zeros(3, 5), torch.zeros(3, 5), num_experts=5)
    groups = routing.groups()
    assert groups.counts == [3, 0, 0, 3, 0]
    assert groups.offsets == [0, 3, 3, 3, 6, 6]
    for e in (1, 2, 4):
        toks, w = groups.expert(e)
        assert toks.numel() == 0 and w.numel() == 0
    toks, w = groups.expert(3)
    assert toks.tolist() == [0, 1, 2] and w.tolist() == pytest.approx([0.6, 0.3, 0.5])
    assert routing.groups() is groups  # computed once, shared by every projection
    assert routing.load().tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5, 0.0])


def test_group_weights_carry_the_gradient_to_the_gate():
    router = make_router()
    routing = router(tokens())
    routing.groups().weights.sum().backward()
    # every token's weights sum to 1, so the gradient of their sum is zero, but it flows
    assert router.gate.weight.grad is not None
    router.gate.weight.grad = None
    routing = router(tokens())
    (routing.groups().weights ** 2).sum().backward()
    assert torch.count_nonzero(router.gate.weight.grad) > 0


class _Recorder(nn.Module):
    """A delta bank stand-in that records the routing it is called with and adds nothing."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name = log, name

    def forward(self, x, call):
        self.log.append((self.name, call.routing))
        return torch.zeros(x.shape[0], 1)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(16, 24, bias=False)
        self.up_proj = nn.Linear(16, 24, bias=False)
        self.down_proj = nn.Linear(24, 16, bias=False)
        self.act_fn = nn.SiLU()


def test_one_decision_per_token_shared_by_the_three_projections():
    log = []
    router = make_router()
    calls = []
    original = router.forward
    router.forward = lambda x, context=None, layer=0: calls.append(1) or original(x, context, layer)
    banks = {name: _Recorder(log, name) for name in ("gate_proj", "up_proj", "down_proj")}
    mlp = SRDEMLP(_MLP(), router, banks, layer=3)
    with mlp.context.using(ForwardContext()) as context:
        mlp(tokens().view(5, 5, 16))
    assert len(calls) == 1
    assert [name for name, _ in log] == ["gate_proj", "up_proj", "down_proj"]
    assert log[0][1] is log[1][1] is log[2][1] is context.routings[3]


def test_a_layer_records_its_routing_by_layer_overwritten_not_appended():
    mlp = SRDEMLP(_MLP(), make_router(), {"up_proj": _Recorder([], "up_proj")}, layer=2)
    context = ForwardContext()
    with mlp.context.using(context):
        mlp(tokens(seed=1))
        first = context.routings[2]
        mlp(tokens(seed=2))
    assert list(context.routings) == [2]
    assert isinstance(context.routings[2], Routing) and context.routings[2] is not first
    mlp(tokens(seed=3))  # outside a context: nothing is recorded anywhere
    assert context.routings[2] is not first and mlp.context.current is None


def test_routing_is_computed_in_float32():
    router = make_router().to(torch.bfloat16)
    routing = router(tokens().to(torch.bfloat16))
    assert routing.logits.dtype == torch.float32 and routing.weights.dtype == torch.float32


# ---- forced routing: equal weights over the experts forced per token, whatever the router's top_k ----


@pytest.mark.parametrize("router_top_k", [1, 3])
@pytest.mark.parametrize("forced_k", [1, 2])
def test_forced_experts_are_weighted_by_the_number_forced_not_by_the_router_top_k(forced_k, router_top_k):
    router = make_router(experts=6, top_k=router_top_k)
    x = tokens(n=12)
    generator = torch.Generator().manual_seed(4)
    forced = torch.stack([torch.randperm(6, generator=generator)[:forced_k] for _ in range(12)])
    routing = router(x, ForwardContext(forced_experts=forced))
    assert torch.equal(routing.experts, forced)
    # each token gets the mean of its forced experts: 1 for one, 1/2 each for two (not 1/router top_k)
    assert torch.equal(routing.weights, torch.full((12, forced_k), 1.0 / forced_k))
    assert torch.equal(routing.weights.sum(1), torch.ones(12))
    # the probabilities and logits stay the router's own (auxiliary losses read them)
    unforced = router(x)
    assert torch.equal(routing.probs, unforced.probs) and torch.equal(routing.logits, unforced.logits)


@pytest.mark.parametrize("forced_k", [1, 2])
def test_a_layer_with_forced_experts_adds_the_mean_of_their_deltas(forced_k):
    """W + (1/k) sum of the forced experts' dense deltas, computed by hand, with a router of top_k 3."""
    from srde_testkit import MaskedDenseBank

    generator = torch.Generator().manual_seed(5)
    base = _MLP().requires_grad_(False)
    banks = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        out, inp = getattr(base, name).weight.shape
        positions = torch.stack([torch.randperm(out * inp, generator=generator)[: out * inp // 2] for _ in range(6)])
        bank = MaskedDenseBank(out, inp, positions)
        with torch.no_grad():
            bank.delta.normal_(0.0, 0.5, generator=generator)
        banks[name] = bank
    mlp = SRDEMLP(base, make_router(experts=6, top_k=3), banks, layer=0)
    forced = torch.stack([torch.randperm(6, generator=generator)[:forced_k] for _ in range(4)])
    x = tokens(n=4)
    with mlp.context.using(ForwardContext(forced_experts=forced)), torch.no_grad():
        y = mlp(x)

    def project(name, t, v):
        linear = getattr(base, name)
        weight = linear.weight + sum(banks[name].delta_weight(int(e)) for e in forced[t]) / forced_k
        return torch.nn.functional.linear(v, weight)

    for t in range(4):
        v = x[t]
        by_hand = project("down_proj", t, torch.nn.functional.silu(project("gate_proj", t, v)) * project("up_proj", t, v))
        torch.testing.assert_close(y[t], by_hand, rtol=1e-5, atol=1e-6)
