"""The recipe's sections: field types, defaults, ranges and help in one place.

Sections that belong to a subsystem (``[data]``, ``[tokenizer]``) are declared next to it and
imported here. A component field (``layout``, ``scheduler``, a loss) holds either the component's
name or a table with ``name`` and its arguments; those are resolved against the registries.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from srde_core.data.params import DataParams, TokenizerParams
from srde_core.params import Params

ComponentSpec = str | dict[str, Any]
Projection = Literal["gate_proj", "up_proj", "down_proj"]


class ModelParams(Params):
    architecture: str = Field(
        "Ministral3ForCausalLM", description="transformers model class of the base model"
    )
    name_or_path: str | None = Field(
        None, description="HF hub id or local directory; unset: build a fresh model from `config`"
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="config overrides (the whole config when building from scratch)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="base weight dtype")
    attn_implementation: str = Field("sdpa", description="attention kernel; plugins may change it")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")


class SRDEParams(Params):
    projections: list[Projection] = Field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="MLP projections that get expert deltas",
    )
    layout: ComponentSpec = Field("uniform", description="layout component: which layers, how many experts")
    delta: ComponentSpec = Field("sparse", description="delta type component")
    selector: ComponentSpec = Field("magnitude", description="selector component (for deltas that use one)")


class PhaseParams(Params):
    """The keys every phase has; any other key of a phase is an argument of its trainer."""

    name: str = Field(min_length=1, description="phase name (unique; used in checkpoints and logs)")
    trainer: str = Field(description="trainer component")
    steps: int = Field(ge=1, description="optimiser steps")
    batch_size: int = Field(16, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables clipping")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="autocast: auto = bf16 on capable GPUs")
    scheduler: ComponentSpec = Field("warmup_cosine", description="LR schedule component")
    losses: list[ComponentSpec] = Field(
        default_factory=lambda: ["lm"], min_length=1, description="loss components, each with an optional weight"
    )
    log_every: int = Field(10, ge=1, description="steps between metric lines")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per phase")


class EvalParams(Params):
    max_examples_per_domain: int = Field(50, ge=1, description="eval examples per domain for accuracy")
    max_new_tokens: int = Field(8, ge=1, description="generation length for answer checking")
    batch_size: int = Field(32, ge=1)


class RecipeParams(Params):
    """The top level of a recipe (``extends`` is consumed before validation)."""

    name: str = Field(min_length=1, description="run name: the run directory is output_dir/name")
    description: str = ""
    seed: int = 0
    output_dir: str = Field("runs", description="where run directories go (relative to the working directory)")
    cache_dir: str = Field(".cache/srde", description="data, tokenisation and base-model caches")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelParams = Field(default_factory=ModelParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    data: DataParams
    srde: SRDEParams = Field(default_factory=SRDEParams)
    phases: list[dict[str, Any]] = Field(min_length=1, description="[[phases]] tables, run in order")
    eval: EvalParams = Field(default_factory=EvalParams)
    plugins: dict[str, Any] = Field(
        default_factory=dict, description="`require = [...]` and one [plugins.NAME] table per plugin setting"
    )
