"""The recipe's sections: field types, defaults, ranges and help in one place.

Sections that belong to a subsystem (``[data]``, ``[tokenizer]``) are declared next to it and
imported here. A component field (``engine``, ``layout``, a phase's ``trainer``, a loss) holds
either the component's name or a table with ``name`` and its arguments; those are resolved against
the registries (:func:`srde_core.params.component`), arguments nested under the choice.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from srde_core.data.params import DataParams, TokenizerParams
from srde_core.model.projections import check_projections
from srde_core.params import Params, component
from srde_core.registry import ComponentChoice


class ModelParams(Params):
    architecture: str = Field(
        "Ministral3ForCausalLM", description="transformers model class of the base model"
    )
    name_or_path: str | None = Field(
        None, description='HF hub id or local directory; unset (or "", to unset an extended one): build a fresh model from `config`'
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="config overrides (the whole config when building from scratch)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="base weight dtype")
    attn_implementation: str = Field("sdpa", description="attention kernel; plugins may change it")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")

    @field_validator("name_or_path")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None


class SRDEParams(Params):
    projections: tuple[str, ...] = Field(
        default=("gate_proj", "up_proj", "down_proj"),
        description="MLP projections that get expert deltas (gate_proj, up_proj, down_proj)",
    )
    layout: ComponentChoice = component("layout", "uniform", "which layers get experts, how many, top-k")
    delta: ComponentChoice = component("delta", "sparse", "how an expert changes a weight (its selector nested)")
    router: ComponentChoice = component("router", "topk", "token -> experts: top-k and gate normalisation")
    combine: ComponentChoice = component("combine", "weighted_sum", "how a token's k expert terms combine")

    @field_validator("projections", mode="before")
    @classmethod
    def _projections(cls, value: object) -> object:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return value  # the type check reports it
        return check_projections(value)


class PhaseParams(Params):
    """The keys of a ``[[phases]]`` table (a trainer's own arguments go in its ``trainer`` table)."""

    name: str = Field(min_length=1, description="phase name (unique; used in checkpoints and logs)")
    trainer: ComponentChoice = component("trainer", description="what the phase does; its arguments nested here", required=True)
    sampler: ComponentChoice = component("sampler", "shuffled", "which examples make each step's global batch")
    steps: int = Field(ge=1, description="optimiser steps")
    batch_size: int = Field(16, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables clipping")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="autocast: auto = bf16 on capable GPUs")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a step with a NaN/inf loss or gradient: stop the run (one line), or skip its update and count it",
    )
    scheduler: ComponentChoice = component("scheduler", "warmup_cosine", "LR schedule component")
    losses: tuple[ComponentChoice, ...] = component(
        "loss", ["lm"], "loss components, each with an optional weight (a number or a schedule)",
        many=True, weighted=True,
    )
    @field_validator("losses")
    @classmethod
    def _some_loss(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("a phase needs at least one loss")
        return value

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
    base_seed: int | None = Field(
        None,
        description=(
            "seed of the base model: its random initialisation and the phases that train it "
            "(base_pretrain); default: seed. Fix it to share one trained, cached base across runs "
            "that vary seed (the experts' initialisation, routing and data order)"
        ),
    )
    output_dir: str = Field("runs", description="where run directories go (relative to the working directory)")
    cache_dir: str = Field(".cache/srde", description="data, tokenisation and base-model caches")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: ComponentChoice = component("engine", "torch", "training engine: torch, ddp, deepspeed, ...")
    model: ModelParams = Field(default_factory=ModelParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    data: DataParams
    srde: SRDEParams = Field(default_factory=SRDEParams)
    phases: list[PhaseParams] = Field(min_length=1, description="[[phases]] tables, run in order")
    eval: EvalParams = Field(default_factory=EvalParams)
    plugins: dict[str, Any] = Field(
        default_factory=dict, description="`require = [...]` and one [plugins.NAME] table per plugin setting"
    )

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, value: str) -> str:
        """The run directory is ``output_dir/name``: a name that is a path (separators, ``.``,
        ``..``, absolute) would put it, and what ``--fresh`` deletes, elsewhere."""
        if value in (".", "..") or any(c in value for c in "/\\\0"):
            raise ValueError("must be one directory name inside output_dir (no '/' or '\\', not '.' or '..')")
        return value

    @property
    def base_model_seed(self) -> int:
        """The seed of the base model (``base_seed``, else ``seed``)."""
        return self.seed if self.base_seed is None else self.base_seed
