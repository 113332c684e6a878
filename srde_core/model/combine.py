"""The combine step: how the ``k`` expert terms of a token become one (the ``combine`` kind).

An SRDE layer computes, for each projection with a bank, ``merge(base(x), delta(x))`` where
``delta(x) = sum_k w_k dW_{e_k} x`` uses the gate weights that :meth:`CombineStep.weights`
returns. The default (:class:`WeightedSum`) keeps the router's weights and adds the delta term;
a fusion plugin re-weights the experts per token (a learned gate over the k terms), spreads the
weight over all experts (a soft merge of expert deltas, SMEAR-style: ``sum_e p_e dW_e`` is one
merged delta because deltas are linear), or changes how the term meets the base output. The dense
reference (:mod:`srde_core.model.reference`) follows the same two steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing


class CombineStep(nn.Module):
    """One layer's combine step. Parameters it owns train and are saved with the adapter."""

    def weights(self, routing: Routing, x: torch.Tensor, context: ForwardContext) -> Routing:
        """The routing the banks use (``routing.with_weights(...)``); by default unchanged. Not
        called for a layer whose experts the context forces (Phase 1): forced stays forced."""
        return routing

    def merge(self, base: torch.Tensor, delta: torch.Tensor, projection: str) -> torch.Tensor:
        """One projection's output from its base output and its expert term ``[T, out]``."""
        return base + delta.to(base.dtype)


class WeightedSum(CombineStep):
    """The router's gate weights, delta term added: ``W x + sum_k w_k dW_{e_k} x``."""


class CombineType(ABC):
    """A ``combine`` component: builds the combine step of each SRDE layer."""

    @abstractmethod
    def make_combine(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator) -> CombineStep:
        """A combine step for one layer, its parameters drawn from ``generator`` (CPU)."""
