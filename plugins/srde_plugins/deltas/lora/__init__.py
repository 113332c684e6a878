"""Low-rank delta experts (`lora`): dW_e = (alpha / r) B_e A_e per expert, B starting at zero.

The mixture of LoRA experts: each expert of a projection is a rank-``r`` delta. The experts of one
projection run as one grouped computation: ``x A^T`` for every expert at once (one GEMM of width
``E r``), the gate weights of each token's chosen experts applied to their ``r`` columns, and one
GEMM with ``B`` back to the output; no Python loop per token or per expert. At equal trainable
parameters (``E r`` equal to a plain LoRA's rank) the two GEMMs are the size of plain LoRA's.
Untrained (B = 0) the model equals its base.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import Params


class LoRADeltaParams(Params):
    """Arguments of the ``lora`` delta type."""

    rank: int = Field(8, ge=1, description="rank r of each expert's delta")
    alpha: float = Field(16.0, gt=0, description="scale: dW = (alpha / rank) B A")
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="A's initialisation: kaiming-uniform (as PEFT) or normal(0, 1/r)"
    )


@hookimpl
def srde_register(registry):
    registry.add(
        "delta", "lora", "srde_plugins.deltas.lora.bank:LoRADelta", LoRADeltaParams,
        "Per-expert low-rank deltas (alpha/r) B A, all experts of a projection in two GEMMs.",
    )
