"""Scalar schedules (registered by :mod:`srde_plugins.schedules`)."""

from __future__ import annotations

import math

from srde_core.train.schedules import Schedule


class Constant(Schedule):
    def __init__(self, params):
        self.params = params

    def value(self, step: int, total_steps: int) -> float:
        return self.params.value

    def done(self, step: int, total_steps: int) -> bool:
        return True


class _Ramp(Schedule):
    def __init__(self, params):
        self.params = params

    def progress(self, step: int, total_steps: int) -> float:
        p = self.params
        span = p.steps or max(1, total_steps - p.delay - 1)
        return min(1.0, max(0.0, (step - p.delay) / span))

    def value(self, step: int, total_steps: int) -> float:
        p = self.params
        return self.shape(p.start, p.end, self.progress(step, total_steps))

    def done(self, step: int, total_steps: int) -> bool:
        return self.progress(step, total_steps) >= 1.0

    def shape(self, start: float, end: float, t: float) -> float:
        raise NotImplementedError


class Linear(_Ramp):
    def shape(self, start: float, end: float, t: float) -> float:
        return start + (end - start) * t


class Cosine(_Ramp):
    def shape(self, start: float, end: float, t: float) -> float:
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


class Exponential(_Ramp):
    def shape(self, start: float, end: float, t: float) -> float:
        return start * (end / start) ** t
