"""Expert fusion combine steps (registered by :mod:`srde_plugins.routing`).

- ``gated``: a learned per-token gate on each of the k expert terms,
  ``w'_tk = w_tk * 2 sigmoid(x_t . v_{e_tk} + b_{e_tk})``; ``v`` and ``b`` start at zero, so an
  untrained gate is the plain weighted sum, and the gate learns per token how much of each chosen
  expert to apply.
- ``soft_merge``: every expert, weighted by the router's full-softmax probabilities (a soft merge
  of the expert deltas, ``sum_e p_e dW_e``, in the spirit of SMEAR: one merged delta per token,
  since deltas are linear). Costs ``E / k`` times the expert compute of top-k routing. The routing
  keeps the router's top-k as its decision (``Routing.routed``): the load balance, the routing
  statistics and ``srde eval``'s expert x domain counts read that, not the E experts applied.
"""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.combine import CombineStep, CombineType
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing


class GatedFusion(CombineStep):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def weights(self, routing: Routing, x: torch.Tensor, context: ForwardContext) -> Routing:
        v = self.weight[routing.experts]  # [T, k, H]
        scores = torch.einsum("tkh,th->tk", v, x.to(v.dtype)) + self.bias[routing.experts]
        return routing.with_weights(routing.weights * 2.0 * torch.sigmoid(scores))


class SoftMerge(CombineStep):
    def weights(self, routing: Routing, x: torch.Tensor, context: ForwardContext) -> Routing:
        experts = torch.arange(routing.num_experts, device=x.device).expand(x.shape[0], -1)
        return routing.with_weights(routing.probs, experts)


class GatedFusionType(CombineType):
    def __init__(self, params=None):
        self.params = params

    def make_combine(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator) -> CombineStep:
        return GatedFusion(hidden_size, num_experts)


class SoftMergeType(CombineType):
    def __init__(self, params=None):
        self.params = params

    def make_combine(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator) -> CombineStep:
        return SoftMerge()
