"""The RL maths of the `grpo` and `ppo` trainers, as functions of tensors (see :mod:`srde_plugins.rl`).

Each follows a published reference, named in its docstring:

- DeepSeekMath (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models", sec. 4.1) for GRPO's group-relative advantages and its k3 KL estimate;
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (eq. 7) for the clipped surrogate;
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
  for GAE, and OpenAI's ``lm-human-preferences`` (``train_policy.py``) with TRL's ``PPOTrainer`` for
  the clipped value loss and the masked whitening of advantages.

Means over tokens and the whitening statistics are taken over every process (``dist.all_sum``), so N
processes at batch b compute what one process computes at batch N x b.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages (DeepSeekMath, sec. 4.1.2): each answer's reward minus the mean of
    its group (the answers to one prompt), over the group's standard deviation,
    ``(r_i - mean(r)) / (std(r) + eps)``; the std is the sample std, as in TRL's ``GRPOTrainer``.
    ``rewards`` is ``[prompts * group_size]``, grouped prompt by prompt; returns the same shape."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    return (centred / (grouped.std(1, keepdim=True) + eps)).reshape(-1)


def clipped_surrogate(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, negated to a loss (Schulman et al. 2017, eq. 7):
    ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with ``rho = exp(new - old)``. A token whose ratio
    left the trust region in the direction its advantage pushes gets no gradient. Also returns where
    the ratio is outside ``[1 - eps, 1 + eps]`` (the clip fraction's numerator)."""
    ratio = torch.exp(new - old)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -surrogate, (ratio - 1).abs() > clip


def k3_kl(new: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of ``KL(pi || pi_ref)`` per sampled token (DeepSeekMath eq. 4; Schulman 2020,
    "Approximating KL divergence"): ``pi_ref/pi - log(pi_ref/pi) - 1`` from the log-probabilities
    ``new = log pi(o_t)`` and ``ref = log pi_ref(o_t)``; unbiased under ``o_t ~ pi``, never negative."""
    log_ratio = ref - new
    return torch.exp(log_ratio) - log_ratio - 1


def gae(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 16) over each row's valid tokens:
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, the value after
    an episode's last token 0. ``[N, C]`` each; valid tokens are a prefix of each row."""
    valid = valid.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        carry = valid[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        next_value = values[:, t + 1] * carry if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running * carry) * valid[:, t]
        advantages[:, t] = running
    return advantages


def token_mean(values: torch.Tensor, mask: torch.Tensor, dist) -> torch.Tensor:
    """This process's share of the mean of ``values`` over the masked tokens of every process:
    ``sum(values * mask) * world / global_tokens``; the engine averages gradients over processes,
    so the step sees the global mean exactly."""
    mask = mask.to(values.dtype)
    tokens = dist.all_sum(mask.sum().detach().double()).clamp_min(1).to(values.dtype)
    return (values * mask).sum() * dist.world_size / tokens


def whiten(values: torch.Tensor, mask: torch.Tensor, dist, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked tokens of every process, the variance with
    Bessel's correction, as TRL's ``masked_whiten`` (shift_mean); zero where not masked."""
    mask_f = mask.to(torch.float64)
    x = values.detach().to(torch.float64)
    stats = dist.all_sum(torch.stack([mask_f.sum(), (x * mask_f).sum(), (x * x * mask_f).sum()]))
    count, total, squares = stats[0], stats[1], stats[2]
    mean = total / count.clamp_min(1)
    var = (squares - count * mean * mean).clamp_min(0) / (count - 1).clamp_min(1)
    whitened = (values - mean.to(values.dtype)) * torch.rsqrt(var + eps).to(values.dtype)
    return whitened * mask.to(values.dtype)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float | None) -> torch.Tensor:
    """Per token, ``0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` as OpenAI's
    ``lm-human-preferences`` (``train_policy.py``, ``cliprange_value``) and TRL's ``PPOTrainer``;
    ``clip = None`` gives the unclipped ``0.5 (V - R)^2``."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped)


def answer_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / T)`` at ``targets``: the log-probabilities of the sampled tokens under
    the distribution they were sampled from (TRL's ``PPOTrainer`` divides by the temperature too)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def answer_imbalance(experts: torch.Tensor, num_experts: int, at: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The load imbalance of each answer's own routing in one layer, ``[N]``: over the routed slots
    of the answer's tokens only (``at``: their positions, ``[N, C]``; ``valid``: which are tokens),
    with ``f_e`` the fraction of those slots routed to expert ``e``, ``E sum_e f_e^2 - 1`` (0 when
    balanced, ``E - 1`` when one expert takes all; the routed-fraction term of Switch's load-balance
    loss). ``experts`` is the layer's ``[N * L, k]`` routing, example by example; 0 for an empty answer."""
    n, k = at.shape[0], experts.shape[1]
    picked = experts.view(n, -1, k)[torch.arange(n, device=at.device)[:, None], at]  # [N, C, k]
    counts = torch.zeros(n, num_experts, dtype=torch.float64, device=experts.device)
    weights = valid[..., None].expand_as(picked).to(torch.float64)
    counts.scatter_add_(1, picked.reshape(n, -1), weights.reshape(n, -1))
    slots = counts.sum(1)
    fraction = counts / slots.clamp_min(1)[:, None]
    return torch.where(slots > 0, num_experts * fraction.pow(2).sum(1) - 1, torch.zeros_like(slots))
