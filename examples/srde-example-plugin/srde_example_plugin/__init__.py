"""Example third-party plugin: the inverse_sqrt learning-rate schedule and the `full` delta."""

from __future__ import annotations

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import Params


class InverseSqrtParams(Params):
    warmup_steps: int = Field(10, ge=1, description="steps of linear warm-up; then lr * sqrt(warmup / step)")


def inverse_sqrt(params: InverseSqrtParams, total_steps: int):
    """Linear warm-up, then decay with the inverse square root of the step."""
    warmup = params.warmup_steps

    def schedule(step: int) -> float:
        step += 1
        return step / warmup if step < warmup else (warmup / step) ** 0.5

    return schedule


@hookimpl
def srde_register(registry):
    registry.add("scheduler", "inverse_sqrt", inverse_sqrt, InverseSqrtParams)
    # lazy "module:attr" factory: listing plugins does not import torch
    from srde_example_plugin.params import FullParams

    registry.add("delta", "full", "srde_example_plugin.delta:FullDelta", FullParams, "Whole dense per-expert deltas.")
