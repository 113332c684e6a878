"""The ``trainer`` kind: what a phase does.

A trainer factory(params) returns a :class:`Trainer`; ``run(run, phase)`` trains (through
:func:`srde_core.train.driver.drive`, which owns resume, checkpoints, metrics, progress, the RNG
and the data position) and returns the phase's final metrics: a dict, or a :class:`PhaseResult`
when the phase also gives the run a new base (a trainer that trains or replaces the base weights
returns their :class:`BaseInfo`; the run records it, and never reads it from anywhere else).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BaseInfo:
    """The base weights a run's experts train on: an id (checked when an adapter loads) and, for a
    base trained by the run itself, the file holding its weights."""

    id: str
    weights: str | None = None


@dataclass
class PhaseResult:
    """What a phase returns: its final metrics and, when it trained or replaced the base weights,
    the new base (None: the run's base stays as it is)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    base: BaseInfo | None = None

    @classmethod
    def of(cls, returned: Any) -> PhaseResult:
        """A trainer's return value (a PhaseResult, a dict of metrics or None) as a PhaseResult."""
        if isinstance(returned, PhaseResult):
            return returned
        return cls(dict(returned or {}))


class Trainer(ABC):
    @abstractmethod
    def run(self, run: Any, phase: Any) -> dict[str, Any] | PhaseResult | None:
        """Run ``phase`` of ``run`` (a :class:`srde_core.run.RunContext`); return its final metrics,
        or a :class:`PhaseResult` with the base it trained (``run.base`` is the core's to set)."""
