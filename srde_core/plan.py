"""The memory plan of a recipe, per GPU, from the model's config alone (``srde plan``).

The base model is built on the meta device (no weights, no memory) and the recipe's experts are
attached to it, so every count below is the real model's: parameters (frozen, by dtype, and
trainable), buffers (rotary tables, the experts' positions and index structures). The rest
follows from those and the phase's sizes:

- gradients: one per trainable element, in its dtype (the experts' are fp32);
- optimiser state: AdamW's two fp32 moments per trainable element;
- activations: what autograd saves per token and decoder layer, from the first layer with
  experts on (layers before it need no gradient), for a micro-batch of ``batch_size x seq_len``
  tokens (see :func:`layer_activation_bytes`); with gradient checkpointing, each layer's input;
- backward peak: on top of those, the larger of the LM loss's backward (the fp32 log-softmax and
  gradients of one chunk of labelled positions: ``chunk_tokens`` of the ``lm`` loss, every
  position labelled at most) and one layer's backward (recomputed first when checkpointed).

The engine's table decides what is sharded over ``gpus``: ``zero_stage`` 1 shards the optimiser
state, 2 also the gradients, 3 also the parameters (then a gathered layer is added back);
``offload_optimizer`` / ``offload_params`` move them to CPU memory; from stage 2 on, DeepSpeed's
gradient reduce bucket is added. An engine without
``zero_stage`` (torch, ddp) keeps a full replica on every GPU.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srde_core.errors import RecipeError, UsageError

GiB = 1024**3
ADAM_MOMENTS = 2  # AdamW: exp_avg and exp_avg_sq, fp32 each
ZERO_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size


@dataclass(frozen=True)
class PlanRow:
    """One line of the plan: ``bytes`` per GPU (after sharding), and what it counts."""

    name: str
    bytes: int
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    recipe: str
    phase: str
    engine: str
    gpus: int
    rows: tuple[PlanRow, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(row.bytes for row in self.rows)

    def row(self, name: str) -> PlanRow:
        return next(r for r in self.rows if r.name == name)


def shipped_config_path(name_or_path: str) -> Path:
    """Where a config shipped with SRDE for a hub id lives: ``recipes/model_configs/ORG--NAME.toml``;
    for a local checkpoint directory, the shipped config of the same name (``*--NAME.toml``)."""
    from importlib.resources import files

    folder = Path(str(files("srde_core") / "recipes" / "model_configs"))
    exact = folder / (name_or_path.replace("/", "--") + ".toml")
    if exact.is_file():
        return exact
    name = Path(name_or_path.rstrip("/")).name
    return next(iter(sorted(folder.glob(f"*--{name}.toml"))), exact) if name else exact


def model_config(recipe: Any, *, tokenizer_vocab: int | None = None) -> Any:
    """The transformers config of ``recipe``'s base model, without downloading anything.

    With ``name_or_path``: the config in the local HF cache (or directory), else one shipped with
    SRDE for that id, else ``[model.config]`` alone; ``[model.config]`` overrides either, as in
    ``from_pretrained``. Without: ``[model.config]`` over the tokenizer's vocabulary size, as a
    run builds it.
    """
    from srde_core.model.build import model_class

    spec = recipe.model
    cls = model_class(spec.architecture)
    where = str(recipe.path)
    if spec.name_or_path:
        from srde_core.model.build import model_location

        config = _cached_config(model_location(recipe))
        if config is None and shipped_config_path(spec.name_or_path).is_file():
            config = _shipped_config(spec.name_or_path)
        if config is None:
            if not spec.config:
                raise RecipeError(
                    f"the config of '{spec.name_or_path}' is not in the local HF cache: add a complete "
                    f"[model.config] table, or cache it (huggingface-cli download {spec.name_or_path} config.json)",
                    source=where, key="model.name_or_path",
                )
            return _config_of(cls, spec.config, where)
        config.update(dict(spec.config))
        return config
    defaults = {"vocab_size": tokenizer_vocab} if tokenizer_vocab is not None and "vocab_size" not in spec.config else {}
    return _config_of(cls, {**defaults, **spec.config}, where)


def _config_of(cls, values: dict[str, Any], where: str) -> Any:
    try:
        return cls.config_class(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"invalid model config: {err}", source=where, key="model.config") from None


def _cached_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return None


def _shipped_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    values = tomllib.loads(shipped_config_path(name_or_path).read_text(encoding="utf-8"))
    values.pop("source", None)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def meta_model(recipe: Any, config: Any):
    """``(model, experts)``: the base model built from ``config`` on the meta device in the
    recipe's dtype, frozen, with the recipe's experts attached (also on meta)."""
    import torch

    from srde_core.model.build import attach_recipe_experts, model_class

    cls = model_class(recipe.model.architecture)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=getattr(torch, recipe.model.dtype))
    return model, attach_recipe_experts(model, recipe)


def layer_activation_bytes(config: Any, act_bytes: int, top_k: int, expert_projections: int) -> int:
    """Bytes autograd keeps per token for one decoder layer with experts (Llama-style block).

    Elements per token: the two RMSNorms keep their fp32 input (``2 H``, 4 bytes); attention keeps
    the normed input, q, k, v and its output (``H + 2 q + 2 kv``, q = heads * head_dim, kv =
    kv_heads * head_dim); the gated MLP keeps its input, gate, activation, up and their product
    (``H + 4 I``); the sparse experts keep each routed copy of their inputs in fp32
    (``top_k (H + I)``, the gate/up input shared, when they take the down projection's too).
    """
    from srde_core.model.architectures import text_config

    text = text_config(config)
    hidden, inter = int(text.hidden_size), int(text.intermediate_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // text.num_attention_heads)
    q = int(text.num_attention_heads) * head_dim
    kv = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    saved = 4 * 2 * hidden + act_bytes * (hidden + 2 * q + 2 * kv) + act_bytes * (hidden + 4 * inter)
    experts = 4 * top_k * (hidden + (inter if expert_projections == 3 else 0))
    return saved + experts


def plan_memory(recipe: Any, *, gpus: int = 1, phase: str | None = None, config: Any = None,
                tokenizer_vocab: int | None = None) -> MemoryPlan:
    """The per-GPU memory of training ``phase`` (default: the last) of ``recipe`` on ``gpus`` GPUs."""
    import torch

    if gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}")
    chosen = _phase(recipe, phase)
    config = config if config is not None else model_config(recipe, tokenizer_vocab=tokenizer_vocab)
    model, experts = meta_model(recipe, config)

    trainable = {id(p) for p in experts.trainable_parameters().values()}
    frozen_by_dtype: dict[torch.dtype, int] = {}
    trainable_bytes = trainable_numel = 0
    for p in model.parameters():
        if id(p) in trainable:
            trainable_bytes += _nbytes(p)
            trainable_numel += p.numel()
        else:
            frozen_by_dtype[p.dtype] = frozen_by_dtype.get(p.dtype, 0) + _nbytes(p)
    buffers = sum(_nbytes(b) for b in model.buffers())

    engine = recipe.engine
    params = engine.params
    stage = int(getattr(params, "zero_stage", 0) or 0)
    offload_opt = bool(getattr(params, "offload_optimizer", False))
    offload_params = bool(getattr(params, "offload_params", False))
    shard_opt = gpus if stage >= 1 else 1
    shard_grad = gpus if stage >= 2 else 1
    shard_param = gpus if stage >= 3 else 1
    notes = []
    on_gpu_params = 0 if offload_params and stage >= 3 else 1
    if not on_gpu_params:
        notes.append("parameters offloaded to CPU memory (offload_params)")
    if offload_opt:
        notes.append("optimiser state offloaded to CPU memory (offload_optimizer)")

    activation_rows = _activation_rows(recipe, chosen, config, experts)
    rows = [
        PlanRow(f"frozen params ({_dtype_name(d)})", on_gpu_params * b // shard_param,
                f"{b / GiB:.2f} GiB in all" + (f", / {shard_param} (ZeRO-3)" if shard_param > 1 else ""))
        for d, b in sorted(frozen_by_dtype.items(), key=lambda kv: -kv[1])
    ]
    rows += [
        PlanRow("trainable params", on_gpu_params * trainable_bytes // shard_param, f"{trainable_numel / 1e6:.1f}M fp32"),
        PlanRow("buffers", buffers, "rotary tables, expert positions and CSR indices"),
        PlanRow("gradients", trainable_bytes // shard_grad, f"/ {shard_grad} (ZeRO-{stage})" if shard_grad > 1 else "one per trainable"),
        PlanRow("optimiser state", 0 if offload_opt else ADAM_MOMENTS * 4 * trainable_numel // shard_opt,
                "AdamW, 2 x fp32" + (f", / {shard_opt} (ZeRO-{stage})" if shard_opt > 1 else "")),
        *activation_rows,
    ]
    if stage >= 2:
        bucket = min(ZERO_REDUCE_BUCKET, trainable_numel) * 4
        rows.append(PlanRow("gradient bucket", bucket, "ZeRO: fp32 reduce bucket (DeepSpeed's default 5e8 elements)"))
    if shard_param > 1 and on_gpu_params:
        gathered = 2 * max(_nbytes_module(m) for m in experts.stack.layers)
        rows.append(PlanRow("gathered layers", gathered, "ZeRO-3: a decoder layer in use and one prefetched"))
    return MemoryPlan(str(recipe.path), chosen.name, engine.name, gpus, tuple(rows), tuple(notes))


def _activation_rows(recipe: Any, phase: Any, config: Any, experts: Any) -> list[PlanRow]:
    """The activations a micro-batch of ``phase`` keeps, and the peak of its backward on top."""
    import torch

    from srde_core.model.architectures import text_config

    text = text_config(config)
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    dtype = getattr(torch, recipe.model.dtype)
    autocast = phase.precision == "bf16" or (phase.precision == "auto" and str(recipe.device).startswith("cuda"))
    act_bytes = 2 if autocast else torch.tensor([], dtype=dtype).element_size()
    tokens = phase.batch_size * recipe.data.seq_len
    plans = experts.plans
    first = min(p.layer for p in plans)
    layers = experts.stack.num_layers - first  # every layer from the first one with experts keeps activations
    top_k = max(p.top_k for p in plans)
    per_layer = layer_activation_bytes(config, act_bytes, top_k, len(experts.projections)) * tokens
    labelled = phase.batch_size * (recipe.data.seq_len - 1)
    lm_chunk = min(_chunk_tokens(phase) or labelled, labelled)
    # a chunk's log-softmax, its gradient and the logits' gradient (fp32), a half-precision copy of
    # the logits, and the final hidden states with their gradient
    logits = lm_chunk * vocab * (3 * 4 + (act_bytes if act_bytes < 4 else 0)) + 2 * tokens * hidden * act_bytes
    if recipe.model.gradient_checkpointing:
        activations = layers * tokens * hidden * act_bytes
        how = f"input of {layers} checkpointed layers"
        backward = max(logits, 2 * per_layer)  # a layer recomputed, and its backward
    else:
        activations = layers * per_layer
        how = f"{layers} layers x {tokens} tokens"
        backward = max(logits, per_layer)
    what = f"max(LM loss: fp32 logits of {lm_chunk} positions x {vocab} vocab, one layer's backward)"
    return [PlanRow("activations", activations, how), PlanRow("backward peak", backward, what)]


def _phase(recipe: Any, name: str | None) -> Any:
    if name is None:
        return recipe.phases[-1]
    for phase in recipe.phases:
        if phase.name == name:
            return phase
    raise UsageError(f"--phase: no phase '{name}'; phases: {', '.join(p.name for p in recipe.phases)}")


def _chunk_tokens(phase: Any) -> int | None:
    """The ``lm`` loss's ``chunk_tokens`` in ``phase``; None (no chunks) for other losses."""
    for choice in phase.losses:
        if choice.name == "lm" and hasattr(choice.params, "chunk_tokens"):
            return int(choice.params.chunk_tokens)
    return None


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _nbytes_module(module) -> int:
    return sum(_nbytes(p) for p in module.parameters())


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def print_plan(plan: MemoryPlan, console, *, gpu_memory_gib: float) -> bool:
    """Print ``plan`` as a table with its total; return whether it fits in ``gpu_memory_gib``."""
    from rich.table import Table

    table = Table(title=f"{plan.recipe}: phase '{plan.phase}', engine {plan.engine}, {plan.gpus} GPU(s) — per GPU",
                  title_justify="left")
    table.add_column("")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for row in plan.rows:
        table.add_row(row.name, f"{row.bytes / GiB:.2f}", row.detail)
    table.add_section()
    fits = plan.total <= gpu_memory_gib * GiB
    verdict = "fits" if fits else f"[red]exceeds {gpu_memory_gib:g} GiB by {(plan.total - gpu_memory_gib * GiB) / GiB:.2f}[/]"
    table.add_row("[bold]total[/]", f"[bold]{plan.total / GiB:.2f}[/]", verdict)
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}")
    return fits
