"""Schedules: learning-rate multipliers (``scheduler`` kind) and scalar schedules (``schedule`` kind).

LR: ``constant``, ``warmup_cosine``, ``warmup_linear``. Scalar (a value from ``start`` to ``end``
over ``steps`` optimiser steps, the whole phase by default, held at ``end`` after): ``constant``,
``linear``, ``cosine``, ``exponential``, and ``adaptive`` (a ramp whose length follows the loss trend,
see :mod:`.adaptive`). A loss weight can be one:
``{ name = "load_balance", weight = { name = "linear", start = 0.0, end = 0.05 } }``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from srde_core.hookspecs import hookimpl
from srde_core.params import Params


class WarmupParams(Params):
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 over this many steps")


class DecayParams(WarmupParams):
    min_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final LR as a fraction of the base LR")


class ConstantValueParams(Params):
    value: float = Field(1.0, description="the value at every step")


class RampParams(Params):
    start: float = Field(description="value at step 0")
    end: float = Field(description="value from `steps` on")
    steps: int = Field(0, ge=0, description="steps from start to end; 0: the whole phase")
    delay: int = Field(0, ge=0, description="steps held at `start` before the ramp begins")


class ExponentialParams(RampParams):
    @model_validator(mode="after")
    def _positive(self) -> "ExponentialParams":
        if self.start <= 0 or self.end <= 0:
            raise ValueError("an exponential schedule needs start > 0 and end > 0")
        return self


class AdaptiveParams(Params):
    start: float = Field(description="value at step 0")
    end: float = Field(description="value once the warm-up is done")
    steps: int = Field(ge=1, description="nominal warm-up length in optimiser steps")
    min_steps: int | None = Field(None, ge=1, description="shortest warm-up the loss trend may lead to (default steps / 4)")
    max_steps: int | None = Field(None, ge=1, description="longest warm-up the loss trend may lead to (default 4 * steps)")
    patience: int = Field(10, ge=1, description="steps between two checks of the loss trend")
    threshold: float = Field(0.01, ge=0.0, description="relative loss improvement per check that speeds the warm-up up")
    speedup: float = Field(1.25, gt=1.0, description="factor on the warm-up rate per check (its inverse when the loss stalls)")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="smoothing of the loss moving average")
    metric: str = Field("loss", description="the step metric whose trend is followed")

    @model_validator(mode="after")
    def _bounds(self) -> "AdaptiveParams":
        if not self.shortest <= self.steps <= self.longest:
            raise ValueError("need min_steps <= steps <= max_steps")
        return self

    @property
    def shortest(self) -> int:
        return self.min_steps if self.min_steps is not None else max(1, self.steps // 4)

    @property
    def longest(self) -> int:
        return self.max_steps if self.max_steps is not None else 4 * self.steps


@hookimpl
def srde_run_header(recipe):
    from srde_plugins.schedules.adaptive import check_metrics

    check_metrics(recipe)  # an adaptive schedule's metric is one its phases log
    return None


@hookimpl
def srde_register(registry):
    lr, scalar = "srde_plugins.schedules.lr", "srde_plugins.schedules.scalar"
    registry.add("scheduler", "constant", f"{lr}:constant", WarmupParams,
                 "Constant learning rate after an optional linear warm-up.")
    registry.add("scheduler", "warmup_cosine", f"{lr}:warmup_cosine", DecayParams,
                 "Linear warm-up, then cosine decay to min_ratio of the base learning rate.")
    registry.add("scheduler", "warmup_linear", f"{lr}:warmup_linear", DecayParams,
                 "Linear warm-up, then linear decay to min_ratio of the base learning rate.")
    registry.add("schedule", "constant", f"{scalar}:Constant", ConstantValueParams, "The same value at every step.")
    registry.add("schedule", "linear", f"{scalar}:Linear", RampParams, "Linear from start to end.")
    registry.add("schedule", "cosine", f"{scalar}:Cosine", RampParams, "Half-cosine from start to end.")
    registry.add("schedule", "exponential", f"{scalar}:Exponential", ExponentialParams,
                 "Geometric from start to end (start, end > 0): temperatures, densities.")
    registry.add("schedule", "adaptive", "srde_plugins.schedules.adaptive:AdaptiveRamp", AdaptiveParams,
                 "From start to end over a warm-up that shortens while the loss improves and lengthens when it stalls.")
