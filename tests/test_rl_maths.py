"""The RL maths (`srde_plugins.rl.objective`, `srde_plugins.rl.kl`) on small cases worked out by hand:
functions of tensors, no RL phase."""

from __future__ import annotations

import math

import pytest
import torch

from srde_core.dist import SINGLE
from srde_core.testing import on_two_ranks
from srde_plugins.rl.kl import InitialPolicy, ProportionalKLController, ThresholdKLController
from srde_plugins.rl.objective import (
    answer_logprobs, clipped_surrogate, clipped_value_loss, gae, group_advantages, k3_kl, token_mean, whiten,
)


def test_grpo_advantages_of_a_two_by_three_group_exactly():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    # group 1: mean 1/3; sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    # group 2: mean 2; sample std sqrt((1 + 0 + 1) / 2) = 1
    s1 = math.sqrt(1 / 3) + 1e-4
    expected = [(2 / 3) / s1, (-1 / 3) / s1, (-1 / 3) / s1, -1 / 1.0001, 0.0, 1 / 1.0001]
    assert group_advantages(rewards, 3).tolist() == pytest.approx(expected, abs=1e-12)


def test_the_clipped_objective_passes_gradient_only_inside_the_trust_region():
    eps, step = 0.2, 1e-3
    # ratios just above / just below 1 + eps and 1 - eps, each with a positive and a negative advantage
    ratios = torch.tensor([1 + eps + step, 1 + eps - step, 1 - eps - step, 1 - eps + step] * 2, dtype=torch.float64)
    advantages = torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=torch.float64)
    old = torch.zeros(8, dtype=torch.float64)
    new = ratios.log().requires_grad_()
    loss, clipped = clipped_surrogate(new, old, advantages, eps)
    loss.sum().backward()
    # A > 0: clipped (no gradient) only above 1 + eps; A < 0: only below 1 - eps
    passes = [False, True, True, True, True, True, False, True]
    assert (new.grad != 0).tolist() == passes
    # where it passes, d(-rho A)/d(log rho) = -rho A
    assert new.grad[torch.tensor(passes)].tolist() == pytest.approx((-ratios * advantages)[torch.tensor(passes)].tolist())
    assert clipped.tolist() == [True, False, True, False] * 2


def test_gae_on_a_four_token_episode_at_lambda_one_half():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 0.6, 9.0]])  # the fifth token is padding: never read
    valid = torch.tensor([[True, True, True, True, False]])
    # gamma = 1: deltas r_t + V_{t+1} - V_t = [-0.3, 0.2, 0.2, 0.4] (V after the last token is 0)
    # A_3 = 0.4; A_2 = 0.2 + 0.5 * 0.4 = 0.4; A_1 = 0.2 + 0.5 * 0.4 = 0.4; A_0 = -0.3 + 0.5 * 0.4 = -0.1
    assert gae(rewards, values, valid, 1.0, 0.5)[0].tolist() == pytest.approx([-0.1, 0.4, 0.4, 0.4, 0.0])
    # gamma = 0.5: deltas [-0.4, 0.0, -0.1, 0.4]; A_3 = 0.4; A_2 = -0.1 + 0.25 * 0.4 = 0.0;
    # A_1 = 0.0 + 0.25 * 0.0 = 0.0; A_0 = -0.4 + 0.25 * 0.0 = -0.4
    assert gae(rewards, values, valid, 0.5, 0.5)[0].tolist() == pytest.approx([-0.4, 0.0, 0.0, 0.4, 0.0])


def test_the_k3_kl_estimate_on_a_known_pair():
    # one token: pi(o) = 1/2, pi_ref(o) = 1/4: pi_ref/pi - log(pi_ref/pi) - 1 = 1/2 + log 2 - 1
    value = k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert float(value) == pytest.approx(math.log(2) - 0.5)
    # over pi = (1/2, 1/4, 1/4) against pi_ref = (1/4, 1/2, 1/4) its expectation under pi is KL(pi || pi_ref)
    pi = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    expected = float((pi * (pi / ref).log()).sum())  # 1/2 log 2 - 1/4 log 2 = log(2) / 4
    assert float((pi * k3_kl(pi.log(), ref.log())).sum()) == pytest.approx(expected) == pytest.approx(math.log(2) / 4)
    assert float(k3_kl(ref.log(), ref.log()).abs().max()) == 0.0


def test_the_proportional_kl_controller_follows_ziegler_et_al():
    kl = ProportionalKLController(0.1, target=6.0, horizon=10000)
    kl.update(9.0, sequences=64)  # error 9/6 - 1 = 0.5, clipped to 0.2
    assert kl.coef == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    before = kl.coef
    kl.update(5.4, sequences=64)  # error -0.1
    assert kl.coef == pytest.approx(before * (1 - 0.1 * 64 / 10000))


def test_the_threshold_kl_controller_is_the_ppo_papers_rule():
    kl = ThresholdKLController(0.1, target=6.0)
    kl.update(9.1, 64)
    assert kl.coef == pytest.approx(0.2)  # above 1.5 x target: x 2
    kl.update(8.9, 64)
    assert kl.coef == pytest.approx(0.2)  # inside the band: unchanged
    kl.update(3.9, 64)
    assert kl.coef == pytest.approx(0.1)  # below target / 1.5: / 2


def test_the_clipped_value_loss_follows_the_ppo_reference():
    old = torch.tensor([0.0, 0.0, 0.0])
    returns = torch.tensor([1.0, 1.0, -1.0])
    values = torch.tensor([0.5, 0.1, 0.5], requires_grad=True)
    loss = clipped_value_loss(values, old, returns, 0.2)
    # 1: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clipped branch: no gradient); 2: max(0.81, 0.81) = 0.81;
    # 3: max((0.5+1)^2, (0.2+1)^2) = 2.25 (unclipped: gradient (0.5 + 1))
    assert loss.tolist() == pytest.approx([0.32, 0.405, 1.125])
    loss.sum().backward()
    assert values.grad.tolist() == pytest.approx([0.0, -0.9, 1.5])
    assert clipped_value_loss(values, old, returns, None).tolist() == pytest.approx([0.125, 0.405, 1.125])


def test_log_probabilities_are_taken_at_the_sampling_temperature():
    logits = torch.tensor([[2.0, 0.0]])
    at_half = answer_logprobs(logits, torch.tensor([0]), 0.5)
    assert float(at_half) == pytest.approx(4.0 - math.log(math.exp(4.0) + 1.0), rel=1e-5)  # softmax([4, 0])
    assert float(answer_logprobs(logits, torch.tensor([0]), 1.0)) == pytest.approx(2.0 - math.log(math.exp(2.0) + 1.0), rel=1e-5)


def test_the_initial_policy_reference_keeps_the_values_of_the_phase_start():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    reference = InitialPolicy({"p": p})
    with torch.no_grad():
        p.add_(10.0)  # training moves the policy
    with reference.active():
        assert p.tolist() == [1.0, 2.0]
    assert p.tolist() == [11.0, 12.0]
    restored = InitialPolicy({"p": p})
    restored.load_state_dict(reference.state_dict())  # a resumed phase gets the start's values back
    with restored.active():
        assert p.tolist() == [1.0, 2.0]


def test_ppo_whitening_and_token_means_are_exact_over_processes():
    torch.manual_seed(0)
    advantages = torch.randn(6, 4, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    whole = whiten(advantages, valid, SINGLE)
    # the first process holds one answer with 1 token, the second the rest: per-process statistics would differ
    split = [(advantages[:2], valid[:2]), (advantages[2:], valid[2:])]
    parts = on_two_ranks(lambda dist, a, v: whiten(a, v, dist), split)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-12)
    assert float(whole[valid].mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(whole[valid].std()) == pytest.approx(1.0, abs=1e-6)

    # the engine averages gradients over processes: the mean of the two shares' gradients is the global one
    x = torch.randn(6, 4, dtype=torch.float64)

    def share_grad(dist, values, mask):
        values = values.clone().requires_grad_()
        token_mean(values ** 2, mask, dist).backward()
        return values.grad

    global_values = x.clone().requires_grad_()
    token_mean(global_values ** 2, valid, SINGLE).backward()
    grads = on_two_ranks(share_grad, [(x[:2], valid[:2]), (x[2:], valid[2:])])
    assert torch.allclose(torch.cat(grads) / 2, global_values.grad, atol=1e-12)


def test_utilization_credits_each_answer_for_its_own_routing_and_survives_group_normalisation():
    from srde_core.model.routing import Routing
    from srde_plugins.rl.trainer import GRPO

    # two answers to one prompt, the same verifier reward; prompt = positions 0-2, answer = 3-4, 5 is padding
    experts = torch.tensor([[0, 0, 0, 0, 1, 1],    # answer routed to experts 0 and 1: balanced
                            [1, 1, 1, 0, 0, 1]])   # answer routed to expert 0 only
    # over all 12 tokens both experts take 6: the batch as a whole is balanced
    flat = experts.reshape(-1, 1)
    routing = Routing(flat, torch.ones(12, 1), torch.full((12, 2), 0.5), torch.zeros(12, 2), num_experts=2)
    batch = {"positions": torch.tensor([[2, 3], [2, 3]]), "valid": torch.ones(2, 2, dtype=torch.bool)}
    imbalance = GRPO.imbalance([routing, routing], batch)
    assert imbalance.tolist() == [0.0, 1.0]  # E sum f^2 - 1 over the answer's own slots: 2 (1/4 + 1/4) - 1, 2 - 1
    rewards = torch.tensor([1.0, 1.0]) - 0.5 * imbalance.float()
    advantages = group_advantages(rewards, 2)
    assert advantages[0] > 0 > advantages[1]  # the balanced answer is preferred
    # a slot past the end of an answer (padding) is not counted: the second answer is one token long
    padded = Routing(torch.tensor([[0, 0, 0, 0, 1, 1], [1, 1, 1, 0, 1, 1]]).reshape(-1, 1), torch.ones(12, 1),
                     torch.full((12, 2), 0.5), torch.zeros(12, 2), num_experts=2)
    short = {"positions": torch.tensor([[2, 3], [2, 3]]), "valid": torch.tensor([[True, True], [True, False]])}
    assert GRPO.imbalance([padded], short).tolist() == [0.0, 1.0]
