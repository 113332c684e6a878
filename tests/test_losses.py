from __future__ import annotations

import torch
import torch.nn.functional as F

from srde_testkit import make_router

from srde_core.params import NoParams
from srde_core.train.losses import LossInputs
from srde_plugins.losses import LMParams
from srde_plugins.losses.lm import causal_lm
from srde_plugins.losses.router import load_balance, router_z


def Router(hidden_size, num_experts, top_k):  # noqa: N802  (the built-in topk router)
    return make_router(hidden_size, num_experts, top_k)


def inputs(routings=()):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 7)
    head = torch.nn.Linear(7, 11, bias=False)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3:] = -100
    return LossInputs(hidden=hidden, lm_head=head, labels=labels, batch={}, routings=list(routings))


def test_lm_loss_is_shifted_cross_entropy_over_labelled_positions_only():
    x = inputs()
    logits = x.lm_head(x.hidden)  # the dense reference: logits everywhere, masked targets ignored
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), x.labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(causal_lm(LMParams())(x), expected, atol=1e-6)


def test_lm_loss_gradient_matches_the_dense_reference():
    x = inputs()
    hidden = x.hidden.clone().requires_grad_(True)
    x.hidden = hidden
    causal_lm(LMParams())(x).backward()
    fast = hidden.grad.clone()
    hidden.grad = None
    logits = x.lm_head(hidden)
    F.cross_entropy(logits[:, :-1].reshape(-1, 11), x.labels[:, 1:].reshape(-1), ignore_index=-100).backward()
    assert torch.allclose(fast, hidden.grad, atol=1e-6)


def test_load_balance_is_one_for_uniform_routing_and_larger_when_skewed():
    router = Router(hidden_size=4, num_experts=4, top_k=1)
    with torch.no_grad():
        router.gate.weight.zero_()
    routing = router(torch.randn(64, 4))
    # all-equal logits: probs uniform; top-1 of ties picks expert 0 for every token
    assert torch.allclose(load_balance(NoParams())(inputs([routing])), torch.tensor(1.0))
    with torch.no_grad():
        router.gate.weight[0] = 5.0
    skewed = router(torch.ones(64, 4))
    assert load_balance(NoParams())(inputs([skewed])) > 1.5


def test_load_balance_gradient_reaches_the_router():
    router = Router(hidden_size=4, num_experts=4, top_k=2)
    loss = load_balance(NoParams())(inputs([router(torch.randn(32, 4))]))
    loss.backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_router_losses_are_zero_without_experts():
    assert load_balance(NoParams())(inputs()).item() == 0.0 and router_z(NoParams())(inputs()).item() == 0.0


def test_router_z_penalises_large_logits():
    router = Router(hidden_size=4, num_experts=4, top_k=1)
    small = router_z(NoParams())(inputs([router(torch.randn(8, 4) * 0.01)]))
    large = router_z(NoParams())(inputs([router(torch.randn(8, 4) * 100)]))
    assert large > small
