"""Learning-rate schedules (registered by :mod:`srde_plugins.schedules`).

A ``scheduler`` factory(params, total_steps) returns ``schedule(step) -> float``, the multiplier
of the phase's base learning rate at optimiser step ``step`` (0-based).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from srde_plugins.schedules import DecayParams, WarmupParams


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def constant(params: WarmupParams, total_steps: int) -> Callable[[int], float]:
    """Constant learning rate after an optional linear warm-up."""
    return lambda step: _warmup(step, params.warmup_steps)


def _decay(params: DecayParams, total_steps: int, shape: Callable[[float], float]) -> Callable[[int], float]:
    warmup = min(params.warmup_steps, max(0, total_steps - 1))

    def schedule(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return params.min_ratio + (1.0 - params.min_ratio) * shape(progress)

    return schedule


def warmup_cosine(params: DecayParams, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_ratio of the base learning rate."""
    return _decay(params, total_steps, lambda p: 0.5 * (1.0 + math.cos(math.pi * p)))


def warmup_linear(params: DecayParams, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then linear decay to min_ratio of the base learning rate."""
    return _decay(params, total_steps, lambda p: 1.0 - p)
