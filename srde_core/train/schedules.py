"""Scalar schedules (the ``schedule`` kind): a value over training, apart from LR multipliers.

Density, a Gumbel temperature, a loss weight: anything a plugin wants to vary with the step takes a
``schedule`` component field (``component("schedule", "constant")``) and calls
``schedule.value(step, total_steps)``. A schedule that adapts to training (to the loss trend)
observes each step's metrics and checkpoints its state, so a resumed run continues exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Schedule(ABC):
    """A scalar as a function of the 0-based optimiser step of a phase of ``total_steps`` steps."""

    @abstractmethod
    def value(self, step: int, total_steps: int) -> float:
        """The value at ``step``."""

    def done(self, step: int, total_steps: int) -> bool:
        """Whether the value has reached its end by ``step`` (it changes no more)."""
        return step >= total_steps

    def observe(self, step: int, metrics: dict[str, Any]) -> None:
        """Called after optimiser step ``step`` (1-based count of steps done) with its metrics."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (adaptive schedules); plain Python data."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
