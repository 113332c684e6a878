"""The ``trainer`` kind: what a phase does.

A trainer factory(params) returns a :class:`Trainer`; ``run(run, phase)`` trains (through
:func:`srde_core.train.driver.drive`, which owns resume, checkpoints, metrics, progress, the RNG
and the data position) and returns the phase's final metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Trainer(ABC):
    @abstractmethod
    def run(self, run: Any, phase: Any) -> dict[str, Any]:
        """Run ``phase`` of ``run`` (a :class:`srde_core.run.RunContext`); return its final metrics."""
