"""Baselines: the ``peft_lora`` trainer, PEFT LoRA on the recipe's projections, by default at the
trainable-parameter count of the recipe's experts (the fair comparison for an ablation).

Registration only (no torch); the trainer lives in :mod:`.peft_lora`. Use it in place of the
expert phase: ``trainer = { name = "peft_lora" }`` (``rank = 0``: match the experts' count). ``full_ft``
fine-tunes every weight of the same projections densely (the upper reference; :mod:`.full_ft`).
"""

from __future__ import annotations

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class PeftLoraParams(Params):
    rank: int = Field(
        0, ge=0,
        description=(
            "LoRA rank r; 0: the rank whose trainable parameters come closest to those of the "
            "recipe's [srde] experts (built once on a copy of the model to count them)"
        ),
    )
    alpha: float = Field(0.0, ge=0.0, description="lora_alpha; 0: 2 * rank (PEFT's scale alpha / r is then 2)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="lora_dropout")


@hookimpl
def srde_register(registry):
    registry.add(
        "trainer", "peft_lora", "srde_plugins.baselines.peft_lora:PeftLora", PeftLoraParams,
        "Baseline: PEFT LoRA on the recipe's projections (default: at the experts' trainable-parameter count).",
    )
    registry.add(
        "trainer", "full_ft", "srde_plugins.baselines.full_ft:FullFineTune", NoParams,
        "Baseline: full fine-tuning of the recipe's projections (every weight; the upper reference).",
    )
