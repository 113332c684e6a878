"""The ``topk`` router and the ``weighted_sum`` combine step (registered by :mod:`srde_plugins.routing`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srde_core.model.combine import CombineStep, CombineType, WeightedSum
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Router, RouterType, Routing


class TopKRouter(Router):
    """Linear gate on the MLP input; top-k; gate weights per ``gate`` (see the package docs)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        generator: torch.Generator | None = None,
        *,
        gate: str = "auto",
        init_std: float = 0.0,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        if gate not in ("auto", "softmax_topk", "softmax"):
            raise ValueError(f"gate must be 'auto', 'softmax_topk' or 'softmax', got {gate!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalisation = ("softmax" if top_k == 1 else "softmax_topk") if gate == "auto" else gate
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, init_std or hidden_size**-0.5, generator=generator)

    def route(self, x: torch.Tensor, context: ForwardContext) -> Routing:
        logits = self.gate(x.to(self.gate.weight.dtype)).float()
        probs = F.softmax(logits, dim=-1)
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        if self.normalisation == "softmax":
            weights = torch.gather(probs, 1, experts)
        else:
            weights = F.softmax(top_logits, dim=-1)
        return Routing(experts=experts, weights=weights, probs=probs, logits=logits, num_experts=self.num_experts)

    @torch.no_grad()
    def warm_start(self, directions: torch.Tensor, sample: torch.Tensor) -> None:
        """Gate rows along ``directions`` (unit length), scaled so the logits on ``sample`` have a
        spread of about 2 (a clear but not saturated preference)."""
        units = directions.float() / directions.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        spread = (sample.float() @ units.T).std().clamp_min(1e-6)
        self.gate.weight.copy_((units * (2.0 / spread)).to(self.gate.weight.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, gate={self.normalisation}"


class TopKRouterType(RouterType):
    def __init__(self, params):
        self.params = params

    def make_router(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator) -> TopKRouter:
        return TopKRouter(
            hidden_size, num_experts, top_k, generator, gate=self.params.gate, init_std=self.params.init_std
        )


class WeightedSumType(CombineType):
    def __init__(self, params=None):
        self.params = params

    def make_combine(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator) -> CombineStep:
        return WeightedSum()
