"""Batch samplers (the ``sampler`` kind): which examples make each step's global batch.

A sampler returns the example indices of global micro-batch number ``step`` of a phase; the core
gives process ``r`` of ``W`` the slice ``[r*b:(r+1)*b]`` of the ``W*b`` indices, so one process
at batch ``W*b`` sees exactly the examples that ``W`` processes at batch ``b`` see together. It
must be a pure function of its arguments: a resumed run replays it from the saved step, which is
what makes resumption exact (curricula included). A sampler that orders examples by something the
data does not hold computes it in ``prepare`` (e.g. the base model's loss per example, through
:func:`srde_plugins.data.scores.base_example_scores`, cached so a resumed run reads the same numbers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Sampler(ABC):
    @abstractmethod
    def indices(self, dataset: Any, phase: Any, step: int, batch_size: int, seed: int) -> list[int]:
        """``batch_size`` example indices of ``dataset`` (a ``datasets.Dataset``) for global
        micro-batch ``step`` (0-based, counting micro-batches) of ``phase``."""

    def prepare(self, run: Any, phase: Any) -> None:
        """Called once on every process before the phase's first batch (a resumed phase too), with
        the run (data, model, experts) at that point; nothing by default. What it computes must be
        a deterministic function of the run's inputs, so ``indices`` stays pure."""

    def metrics(self, step: int, batch_size: int, dataset_size: int) -> dict[str, float]:
        """Numbers to log with the optimiser step that starts at micro-batch ``step`` (e.g. a
        curriculum's competence); none by default."""
        return {}


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Process ``rank``'s share of a global batch (contiguous, equal shares)."""
    if len(indices) % world_size:
        raise ValueError(f"a global batch of {len(indices)} does not split over {world_size} processes")
    size = len(indices) // world_size
    return indices[rank * size : (rank + 1) * size]
