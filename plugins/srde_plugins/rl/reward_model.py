"""The reward-model contract, the built-in `head`, and its training alongside the policy
(see :mod:`srde_plugins.rl`).

A reward model maps what the policy made of each sampled answer, the mean over the answer's tokens of
the policy's final hidden states and of the tokens' input embeddings (detached: it never trains the
policy), to one scalar. The final hidden state of a token is shaped to predict the *next* token; the
embeddings keep what the answer said. The RL
trainers add ``weight * r_hat`` to each answer's reward and, every step, fit the reward model to the
verifier's scores ``r`` of that step's answers with its own AdamW (``lr``):

- ``regression``: ``mean((r_hat - r)^2)``;
- ``bradley_terry``: over the pairs of answers to one prompt with ``r_i > r_j``,
  ``mean(-log sigmoid(r_hat_i - r_hat_j))`` (only the order of the rewards is learned).

Under several processes the gradients are averaged over processes, so every copy stays the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class RewardModel(nn.Module, ABC):
    """A learned reward: ``forward(hidden [N, H], embedded [N, H]) -> [N]``, one scalar per sampled
    answer from the means over its tokens of the policy's final hidden states and input embeddings. A factory is called as ``factory(params, hidden_size=H)``;
    its params subclass :class:`srde_plugins.rl.RewardModelParams` (weight, lr, objective)."""

    @abstractmethod
    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        ...


class HeadRewardModel(RewardModel):
    """``w . [LayerNorm(h); LayerNorm(e)] + b`` (``hidden = 0``), or a one-hidden-layer GELU MLP on
    the same features; the output layer starts at zero, so the first predictions are 0."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.norm_embedded = nn.LayerNorm(hidden_size)
        layers: list[nn.Module] = [nn.Linear(2 * hidden_size, width), nn.GELU()] if width else []
        self.out = nn.Linear(width or 2 * hidden_size, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.body = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.norm(hidden), self.norm_embedded(embedded)], dim=-1)
        return self.out(self.body(features)).squeeze(-1)


def make_head(params, hidden_size: int) -> HeadRewardModel:
    return HeadRewardModel(hidden_size, params.hidden)


def fit_loss(objective: str, predicted: torch.Tensor, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The reward model's loss on one rollout batch (see the module docstring)."""
    if objective == "regression":
        return (predicted - rewards).pow(2).mean()
    p, r = predicted.view(-1, group_size), rewards.view(-1, group_size)
    better = r[:, :, None] > r[:, None, :]  # [prompts, i, j]: answer i earned more than answer j
    margins = p[:, :, None] - p[:, None, :]
    if not bool(better.any()):
        return predicted.sum() * 0.0  # no ordered pair: nothing to learn, same graph
    return nn.functional.softplus(-margins[better]).mean()


class RewardModelTrainer:
    """The reward model, its optimiser and objective; checkpointed with the phase (``state_dict``)."""

    def __init__(self, model: RewardModel, params, dist, group_size: int):
        self.model, self.params, self.dist, self.group_size = model, params, dist, group_size
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.0)

    @torch.no_grad()
    def predict(self, answer: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.model(*(x.float() for x in answer))

    def fit(self, answer: tuple[torch.Tensor, torch.Tensor], rewards: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
        """``updates`` optimiser steps on a rollout batch; ``predicted`` is what the model said before it
        (its error is measured on answers it has not been fitted to)."""
        losses = []
        for _ in range(self.params.updates):
            fitted = self.model(*(x.detach().float() for x in answer))
            loss = fit_loss(self.params.objective, fitted, rewards.float(), self.group_size)
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            grads = [p.grad for p in self.model.parameters()]
            flat = self.dist.all_sum(torch.cat([g.reshape(-1) for g in grads])) / self.dist.world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return {"rm_loss": losses[0], "rm_error": float((predicted - rewards).abs().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
