"""Expert-specific losses (`srde_plugins.losses.experts`): hand-computed values, gradients, banks."""

from __future__ import annotations

import math

import pytest
import torch

from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing
from srde_core.params import NoParams
from srde_core.train.losses import LossInputs
from srde_plugins.losses.experts import diversity, specialization


def routing_of(probs: torch.Tensor) -> Routing:
    experts = probs.argmax(1, keepdim=True)
    return Routing(experts, torch.gather(probs, 1, experts), probs, probs.log(), num_experts=probs.shape[1])


def inputs(routings, domain_ids, mask=None, banks=()):
    hidden = torch.zeros(1, 1, 2)
    batch = {} if mask is None else {"attention_mask": mask}
    return LossInputs(hidden=hidden, lm_head=None, labels=None, batch=batch, routings=list(routings),
                      num_domains=2, context=ForwardContext(domain_ids=domain_ids), banks=list(banks))


def test_specialization_is_minus_the_normalised_mutual_information():
    # 2 examples x 2 tokens; example 0 is domain 0, example 1 domain 1. Hand-computed:
    # p(e|d0) = mean([.9,.1],[.7,.3]) = [.8,.2]; p(e|d1) = mean([.2,.8],[.4,.6]) = [.3,.7]
    # p(e) = [.55,.45]; I = H(.55,.45) - (H(.8,.2) + H(.3,.7)) / 2
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])

    def h(*p):
        return -sum(x * math.log(x) for x in p)

    expected = -(h(0.55, 0.45) - (h(0.8, 0.2) + h(0.3, 0.7)) / 2) / math.log(2)
    value = specialization(NoParams())(inputs([routing_of(probs)], torch.tensor([0, 1])))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_specialization_ignores_padding_and_averages_layers():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6]])
    padded = torch.tensor([[1, 0], [1, 1]])  # token 1 of example 0 is padding
    uniform = torch.full((4, 2), 0.5)
    loss = specialization(NoParams())
    one = loss(inputs([routing_of(probs)], torch.tensor([0, 1]), padded))
    kept = probs[[0, 2, 3]]
    alone = loss(inputs([routing_of(kept)], torch.tensor([0, 1, 1])))
    assert one.item() == pytest.approx(alone.item(), rel=1e-6)
    both = loss(inputs([routing_of(probs), routing_of(uniform)], torch.tensor([0, 1]), padded))
    assert both.item() == pytest.approx(one.item() / 2, rel=1e-6)  # the uniform layer has I = 0


def test_specialization_reaches_the_router_logits():
    logits = torch.randn(6, 3, requires_grad=True)
    probs = torch.softmax(logits, 1)
    experts = probs.argmax(1, keepdim=True)
    routing = Routing(experts, torch.gather(probs, 1, experts), probs, logits, num_experts=3)
    specialization(NoParams())(inputs([routing], torch.tensor([0, 1, 0]))).backward()
    assert torch.count_nonzero(logits.grad) > 0


class DenseBank(torch.nn.Module):
    """A stand-in bank with dense deltas: the default DeltaBank.gram, through delta_weight."""

    def __init__(self, deltas):
        super().__init__()
        self.deltas = torch.nn.Parameter(deltas)
        self.num_experts = deltas.shape[0]

    def delta_weight(self, e):
        return self.deltas[e]

    def gram(self):
        from srde_core.model.components import DeltaBank

        return DeltaBank.gram(self)


def test_diversity_is_the_mean_pairwise_squared_cosine_of_the_deltas():
    a, b, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])
    bank = DenseBank(torch.stack([a, b, c]))
    cos_ab, cos_ac, cos_bc = 1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)
    value = diversity(NoParams())(inputs([], None, banks=[bank]))
    assert value.item() == pytest.approx((cos_ab**2 + cos_ac**2 + cos_bc**2) / 3, rel=1e-6)
    flipped = DenseBank(torch.stack([a, -a]))  # opposite changes overlap as much as equal ones
    assert diversity(NoParams())(inputs([], None, banks=[flipped])).item() == pytest.approx(1.0)
    value.backward()
    assert torch.count_nonzero(bank.deltas.grad) > 0


@pytest.mark.parametrize("selector", ["magnitude", "random"])
def test_sparse_gram_equals_the_dense_inner_products(selector):
    from srde_core.plugins import load_plugins
    from srde_core.recipe import resolve_component

    plugins = load_plugins()
    delta = resolve_component(plugins, "delta", {"name": "sparse", "density": 0.3, "selector": selector}).build()
    bank = delta.make_bank(torch.randn(6, 5), 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.values.normal_()
    dense = torch.stack([bank.delta_weight(e).reshape(-1) for e in range(4)])
    torch.testing.assert_close(bank.gram(), dense @ dense.T)


def test_losses_are_zero_without_routings_or_banks():
    empty = inputs([], torch.tensor([0]))
    assert specialization(NoParams())(empty).item() == 0.0 and diversity(NoParams())(empty).item() == 0.0


def test_specialization_is_exact_under_data_parallelism():
    """Two ranks holding unequal shares of one batch (the first sees only domain 0) give the whole
    batch's value, and the mean of their gradients is the whole batch's gradient."""
    from srde_core.testing import on_two_ranks

    torch.manual_seed(0)
    x = torch.randn(10, 3, dtype=torch.float64)
    domains = torch.tensor([0, 0, 0, 1, 0, 1, 1, 0, 1, 1])
    weight = torch.randn(3, 4, dtype=torch.float64)

    def value_and_grad(dist, rows, ids):
        w = weight.clone().requires_grad_()
        probs = torch.softmax(rows @ w, dim=1)
        case = inputs([routing_of(probs)], ids)
        if dist is not None:
            case.dist = dist
        value = specialization(NoParams())(case)
        value.backward()
        return float(value.detach()), w.grad

    whole_value, whole_grad = value_and_grad(None, x, domains)
    parts = on_two_ranks(value_and_grad, [(x[:3], domains[:3]), (x[3:], domains[3:])])
    assert [v for v, _ in parts] == pytest.approx([whole_value] * 2, abs=1e-12)
    assert torch.allclose((parts[0][1] + parts[1][1]) / 2, whole_grad, atol=1e-12)
    local = [value_and_grad(None, x[:3], domains[:3])[0], value_and_grad(None, x[3:], domains[3:])[0]]
    assert abs(sum(local) / 2 - whole_value) > 1e-3  # what the per-process values would have averaged to
