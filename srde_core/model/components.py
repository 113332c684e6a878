"""The contracts of the pluggable SRDE parts: selectors, delta types and layouts.

A plugin registers a *factory* for one of these under a name; the factory receives the validated
params and returns an object with the methods below.

- ``selector`` factory(params) -> :class:`Selector`: which positions of a frozen weight an expert
  may change. Selectors are modules so that learned ones (Gumbel top-k) can own parameters; a
  selector whose choice changes during training re-selects from an ``srde_after_step`` hook and
  the delta bank picks the new positions up through :meth:`DeltaBank.set_positions`.
- ``delta`` factory(params) -> :class:`DeltaType`: builds one :class:`DeltaBank` per projection.
- ``layout`` factory(params) -> :class:`Layout`: which decoder layers get experts, how many,
  top-k per layer, and which layers share one expert bank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from srde_core.model.layout import LayerPlan, Layout  # noqa: F401  (part of this contract)
from srde_core.model.routing import Routing


class Selector(nn.Module, ABC):
    """Chooses, per expert, ``count`` flat positions of a ``(out, in)`` weight."""

    @abstractmethod
    def select(
        self, weight: torch.Tensor, num_experts: int, count: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Return a LongTensor ``[num_experts, count]`` of flat positions, unique and sorted per row."""


class DeltaBank(nn.Module, ABC):
    """The experts' deltas to one projection weight ``W`` of shape ``(out, in)``.

    Subclasses set ``self.num_experts``, ``self.in_features`` and ``self.out_features`` and list
    the names of their trainable parameters in ``trainable_names`` (saved in adapters).
    """

    num_experts: int
    in_features: int
    out_features: int
    trainable_names: tuple[str, ...] = ()

    @abstractmethod
    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``[T, in] -> [T, out]``: row t is ``sum_k routing.weights[t, k] * dW[experts[t, k]] @ x[t]``."""

    @abstractmethod
    def delta_weight(self, expert: int) -> torch.Tensor:
        """The dense ``dW`` of one expert, ``(out, in)``: for the reference path, merging and analysis."""


class DeltaType(ABC):
    """Builds the delta bank of one projection."""

    #: Whether :meth:`make_bank` uses the recipe's selector.
    uses_selector: bool = False

    @abstractmethod
    def make_bank(
        self,
        weight: torch.Tensor,
        num_experts: int,
        selector: Selector | None,
        generator: torch.Generator,
    ) -> DeltaBank:
        """A bank of ``num_experts`` deltas for the frozen ``weight`` (``(out, in)``). The bank
        must start at dW = 0 so that an untrained SRDE model equals its base."""
