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


# ---------------------------------------------------------------------------------------------
# Every formula pinned to a value computed by hand (plain Python math, independent of the code)
# on small non-uniform routings, where the tempting mistakes give different numbers.
# ---------------------------------------------------------------------------------------------

import math

import pytest

from srde_core.model.routing import Routing

E = 3
# Layer A: top-1 of 3 experts over 4 tokens. Routed fractions f = (1/2, 1/4, 1/4), while the mean
# soft probabilities are (0.338, 0.390, 0.272): using P in place of f changes the loss.
LOGITS_A = [[2.0, 0.0, -1.0], [1.0, 1.0, 0.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 2.0]]
EXPERTS_A = [[0], [0], [1], [2]]
# Layer B: top-2 of 3 experts over 4 tokens (8 routed slots): f = (4/8, 1/8, 3/8).
LOGITS_B = [[0.5, -0.5, 1.5], [2.0, 1.0, -2.0], [0.0, 0.0, 1.0], [1.0, -1.0, 0.0]]
EXPERTS_B = [[2, 0], [0, 1], [2, 0], [0, 2]]


def _softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [x / sum(exps) for x in exps]


def _hand_load_balance(logits, experts):
    """E * sum_e f_e * P_e; f_e = share of routed slots, P_e = mean softmax probability."""
    slots = [e for row in experts for e in row]
    f = [slots.count(e) / len(slots) for e in range(E)]
    mean_p = [sum(_softmax(row)[e] for row in logits) / len(logits) for e in range(E)]
    return E * sum(fe * pe for fe, pe in zip(f, mean_p))


def _hand_router_z(logits):
    """mean over tokens of logsumexp(logits)^2."""
    return sum(math.log(sum(math.exp(x) for x in row)) ** 2 for row in logits) / len(logits)


def _routing(logits, experts) -> Routing:
    logits = torch.tensor(logits)
    experts = torch.tensor(experts)
    probs = torch.softmax(logits, dim=-1)
    weights = torch.softmax(torch.gather(logits, 1, experts), dim=-1)
    return Routing(experts, weights, probs, logits, E)


def _inputs(*routings) -> LossInputs:
    return LossInputs(hidden=torch.zeros(1, 2, 4), lm_head=None, labels=torch.zeros(1, 2, dtype=torch.long),
                      batch={}, routings=list(routings))


def test_hand_computed_reference_values_are_what_the_formulas_say():
    # The helpers above, written out once more as numbers (so a slip in a helper cannot hide).
    assert _hand_load_balance(LOGITS_A, EXPERTS_A) == pytest.approx(1.0037628936769787, abs=1e-12)
    assert _hand_load_balance(LOGITS_B, EXPERTS_B) == pytest.approx(1.1745495846806717, abs=1e-12)
    assert _hand_router_z(LOGITS_A) == pytest.approx(5.615509063422475, abs=1e-12)
    assert _hand_router_z(LOGITS_B) == pytest.approx(3.360047372713084, abs=1e-12)


def test_load_balance_uses_routed_fractions_not_soft_probabilities():
    loss = load_balance(NoParams())
    assert loss(_inputs(_routing(LOGITS_A, EXPERTS_A))).item() == pytest.approx(1.0037628936769787, rel=1e-6)
    assert loss(_inputs(_routing(LOGITS_B, EXPERTS_B))).item() == pytest.approx(1.1745495846806717, rel=1e-6)
    # What E * sum_e P_e^2 (soft probabilities in place of f) would give: 1.0212 and 1.1396.
    assert abs(loss(_inputs(_routing(LOGITS_A, EXPERTS_A))).item() - 1.0211505723859013) > 1e-2


def test_load_balance_counts_every_one_of_the_k_slots():
    # f over T*k = 8 slots is (1/2, 1/8, 3/8); counting only the first choice gives (1/2, 0, 1/2).
    first_only = [[row[0]] for row in EXPERTS_B]
    assert _hand_load_balance(LOGITS_B, first_only) == pytest.approx(1.253478512726217, abs=1e-12)
    assert load_balance(NoParams())(_inputs(_routing(LOGITS_B, EXPERTS_B))).item() == pytest.approx(
        _hand_load_balance(LOGITS_B, EXPERTS_B), rel=1e-6
    )


def test_router_z_is_the_token_mean_of_squared_logsumexp():
    loss = router_z(NoParams())
    assert loss(_inputs(_routing(LOGITS_A, EXPERTS_A))).item() == pytest.approx(5.615509063422475, rel=1e-6)
    assert loss(_inputs(_routing(LOGITS_B, EXPERTS_B))).item() == pytest.approx(3.360047372713084, rel=1e-6)


def test_router_losses_average_over_layers_not_sum():
    both = _inputs(_routing(LOGITS_A, EXPERTS_A), _routing(LOGITS_B, EXPERTS_B))
    # mean over the two layers: (1.00376 + 1.17455) / 2 and (5.61551 + 3.36005) / 2
    assert load_balance(NoParams())(both).item() == pytest.approx(1.0891562391788252, rel=1e-6)
    assert router_z(NoParams())(both).item() == pytest.approx(4.487778218067779, rel=1e-6)
    # three layers, one repeated: a sum would be 3x, a mean of the distinct layers would differ too
    three = _inputs(*[_routing(LOGITS_A, EXPERTS_A)] * 2, _routing(LOGITS_B, EXPERTS_B))
    expected = (2 * 1.0037628936769787 + 1.1745495846806717) / 3
    assert load_balance(NoParams())(three).item() == pytest.approx(expected, rel=1e-6)


def test_load_balance_gradient_flows_through_probabilities_only():
    # d/dlogits of E * sum_e f_e * mean_t p_te: f is a constant (no gradient through the routing).
    logits = torch.tensor(LOGITS_A, requires_grad=True)
    routing = Routing(torch.tensor(EXPERTS_A), torch.ones(4, 1), torch.softmax(logits, -1), logits, E)
    load_balance(NoParams())(_inputs(routing)).backward()
    f = [0.5, 0.25, 0.25]
    for t, row in enumerate(LOGITS_A):
        p = _softmax(row)
        # d p_e / d l_j = p_e (delta_ej - p_j)
        expected = [E / 4 * sum(f[e] * p[e] * ((e == j) - p[j]) for e in range(E)) for j in range(E)]
        assert logits.grad[t].tolist() == pytest.approx(expected, abs=1e-6)


def test_lm_loss_by_hand_with_and_without_label_smoothing():
    # vocab 3, identity head: logits are the hidden states. Positions 0 and 1 predict labels 2 and 1;
    # position 2's target is -100 and position 3 predicts nothing.
    hidden = torch.tensor([[[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [3.0, 3.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 2, 1, -100]])
    x = LossInputs(hidden=hidden, lm_head=lambda h: h, labels=labels, batch={})
    rows = [([1.0, 0.0, 2.0], 2), ([0.5, -1.0, 0.0], 1)]
    nll = [-math.log(_softmax(r)[t]) for r, t in rows]
    assert nll == pytest.approx([0.40760596444438046, 2.1041306053367284], abs=1e-12)
    assert causal_lm(LMParams())(x).item() == pytest.approx(sum(nll) / 2, rel=1e-6)
    eps = 0.1
    smooth = [(1 - eps) * n + eps * sum(-math.log(p) for p in _softmax(r)) / 3 for (r, _), n in zip(rows, nll)]
    assert causal_lm(LMParams(label_smoothing=eps))(x).item() == pytest.approx(sum(smooth) / 2, rel=1e-6)


def test_router_losses_ignore_padding_tokens():
    """The same real tokens, padded differently, give the same router losses (and so a batch split
    over processes, each padded to its own longest row, gives what one process gives)."""
    from srde_core.model.routing import Routing

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g)
    probs = torch.softmax(logits, -1)
    experts = probs.topk(2, -1).indices

    def routed(rows):
        return Routing(experts[rows], torch.gather(probs, 1, experts)[rows], probs[rows], logits[rows], num_experts=4)

    def value(loss, rows, mask):
        x = LossInputs(hidden=torch.zeros(1, 1, 7), lm_head=None, labels=None, batch={"attention_mask": mask}, routings=[routed(rows)])
        return float(loss(NoParams())(x))

    real = value(load_balance, [0, 1, 2, 3, 4, 5], torch.ones(2, 3, dtype=torch.long))
    padded_rows = [0, 1, 2, 0, 3, 4, 5, 1]  # two padding slots with whatever routing they got
    padded_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    assert value(load_balance, padded_rows, padded_mask) == pytest.approx(real, rel=1e-6)
    assert value(router_z, padded_rows, padded_mask) == pytest.approx(value(router_z, list(range(6)), torch.ones(2, 3, dtype=torch.long)), rel=1e-6)
