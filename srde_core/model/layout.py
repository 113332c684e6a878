"""The layout contract: which decoder layers get experts, how many, and which share a bank.

Kept free of torch so that layouts can be registered and validated without importing it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerPlan:
    """Experts for one decoder layer. Layers with the same ``bank`` key share their delta banks
    (cross-layer sharing); each layer keeps its own router."""

    layer: int
    num_experts: int
    top_k: int
    bank: str


class Layout(ABC):
    """Decides where experts go."""

    @abstractmethod
    def plan(self, num_layers: int) -> list[LayerPlan]:
        """One :class:`LayerPlan` per decoder layer that gets experts, in layer order."""
