"""The per-token router: one top-k decision per token per MLP block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ExpertGroups:
    """Token slots grouped by expert, computed once per routing and shared by every projection.

    ``tokens[offsets[e]:offsets[e+1]]`` are the token indices routed to expert ``e`` and
    ``weights`` the matching gate values (same order).
    """

    tokens: torch.Tensor  # [T*k] long
    weights: torch.Tensor  # [T*k] gate values, differentiable
    counts: list[int]
    offsets: list[int]

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.offsets[e], self.offsets[e + 1]
        return self.tokens[lo:hi], self.weights[lo:hi]


@dataclass
class Routing:
    """One routing decision for a flat batch of ``T`` tokens."""

    experts: torch.Tensor  # [T, k] long
    weights: torch.Tensor  # [T, k], softmax over the chosen k
    probs: torch.Tensor  # [T, E], softmax over all experts (for auxiliary losses)
    logits: torch.Tensor  # [T, E]
    num_experts: int
    _groups: ExpertGroups | None = field(default=None, repr=False)
    #: Scratch space for the projections of one block during one forward (e.g. a delta bank keeps
    #: the per-expert gathered input that gate_proj and up_proj share). Cleared by the layer.
    scratch: dict = field(default_factory=dict, repr=False)

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    def groups(self) -> ExpertGroups:
        if self._groups is None:
            flat_experts = self.experts.reshape(-1)
            order = torch.argsort(flat_experts, stable=True)
            k = self.experts.shape[1]
            counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
            offsets = [0]
            for c in counts:
                offsets.append(offsets[-1] + c)
            self._groups = ExpertGroups(
                tokens=order // k,
                weights=self.weights.reshape(-1)[order],
                counts=counts,
                offsets=offsets,
            )
        return self._groups

    def load(self) -> torch.Tensor:
        """Fraction of routed token slots per expert, ``[E]`` (no gradient)."""
        counts = torch.bincount(self.experts.reshape(-1), minlength=self.num_experts)
        return counts.float() / max(1, self.experts.numel())


class Router(nn.Module):
    """Linear gate on the MLP input; top-k; softmax over the chosen k.

    The last routing is kept on ``self.last`` for losses and statistics. It is overwritten (never
    appended) on each forward, so gradient checkpointing, which runs the forward again during
    backward, cannot double-count it.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, hidden_size**-0.5, generator=generator)
        self.last: Routing | None = None

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x.to(self.gate.weight.dtype)).float()
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        routing = Routing(
            experts=experts,
            weights=F.softmax(top_logits, dim=-1),
            probs=F.softmax(logits, dim=-1),
            logits=logits,
            num_experts=self.num_experts,
        )
        self.last = routing
        return routing
