"""The memory plan of a recipe, per GPU, from the model's config alone (``srde plan``, the runtime
plugin's command: :mod:`srde_plugins.runtime.commands`; the config: :func:`srde_core.model.config.model_config`).

The base model is built on the meta device (no weights, no memory) and the recipe's experts are
attached to it, so every count below is the real model's: parameters (frozen, by dtype, and
trainable), buffers (rotary tables, the experts' positions and index structures). The rest
follows from those and the phase's sizes:

- gradients: one per trainable element, in its dtype (the experts' are fp32);
- optimiser state: AdamW's two fp32 moments per trainable element;
- trainer's copies: copies of the trainable parameters a trainer keeps (``trainable_copies`` of its
  params: the RL trainers' frozen KL reference);
- activations: what autograd saves per token and decoder layer, from the first layer with
  experts on (layers before it need no gradient), for a micro-batch of ``batch_size x seq_len``
  tokens (see :func:`layer_activation_bytes`), plus what each layer's delta banks keep (asked of
  the banks: :meth:`DeltaBank.activation_bytes`); with gradient checkpointing, each layer's input;
- selectors' buffers: what the banks and their selectors allocate at their peak step
  (:meth:`DeltaBank.transient_bytes`, e.g. a dense gradient a selector accumulates for growth);
- backward peak: on top of those, the larger of the LM loss's backward (the fp32 log-softmax and
  gradients of one chunk of labelled positions: ``chunk_tokens`` of the ``lm`` loss, every
  position labelled at most) and one layer's backward (recomputed first when checkpointed).

The engine decides what is sharded over ``gpus``, kept in CPU memory or added (its
:meth:`Engine.memory`, an :class:`EngineMemory`: shards, offloading, a master copy, buckets, the
layers it gathers, and the name the rows quote for its scheme); by default every GPU keeps a full
replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from srde_core.errors import UsageError
from srde_core.model.config import model_config

GiB = 1024**3
ADAM_MOMENTS = 2  # AdamW: exp_avg and exp_avg_sq, fp32 each


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
    peak: str = ""  # what sets the peak: a phase, or a transition

    @property
    def allocated(self) -> int:
        """The tensors alone (the total less the context and the allocator margin)."""
        return sum(row.bytes for row in self.rows if row.name not in ("context and libraries", "allocator margin"))

    @property
    def total(self) -> int:
        return sum(row.bytes for row in self.rows)

    def row(self, name: str) -> PlanRow:
        return next(r for r in self.rows if r.name == name)


def meta_model(recipe: Any, config: Any):
    """``(model, experts)``: the base model built from ``config`` on the meta device in the
    recipe's dtype, frozen, with the recipe's experts attached (also on meta)."""
    import torch

    from srde_core.model.build import attach_recipe_experts, model_class

    cls = model_class(recipe.model.architecture)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=getattr(torch, recipe.model.dtype))
    return model, attach_recipe_experts(model, recipe)


def layer_activation_bytes(config: Any, act_bytes: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (Llama-style block), its experts aside
    (the banks say theirs: :func:`bank_activation_bytes`).

    Elements per token: the two RMSNorms keep their fp32 input (``2 H``, 4 bytes); attention keeps
    the normed input, q, k, v and its output (``H + 2 q + 2 kv``, q = heads * head_dim, kv =
    kv_heads * head_dim); the gated MLP keeps its input, gate, activation, up and their product
    (``H + 4 I``).
    """
    from srde_core.model.architectures import text_config

    text = text_config(config)
    hidden, inter = int(text.hidden_size), int(text.intermediate_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // text.num_attention_heads)
    q = int(text.num_attention_heads) * head_dim
    kv = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    return 4 * 2 * hidden + act_bytes * (hidden + 2 * q + 2 * kv) + act_bytes * (hidden + 4 * inter)


def bank_activation_bytes(experts: Any, tokens: int) -> list[int]:
    """Per layer with experts: the bytes its delta banks keep for ``tokens`` tokens
    (:meth:`DeltaBank.activation_bytes`), gate_proj and up_proj sharing what they share (one cache
    for the projections of the layer's input, another for down_proj's), as in the layer's forward."""
    banks = experts.banks()
    per_layer = []
    for plan in experts.plans:
        caches: dict[bool, dict] = {False: {}, True: {}}
        per_layer.append(sum(bank.activation_bytes(tokens, plan.top_k, caches[name == "down_proj"])
                             for name, bank in banks[plan.bank].items()))
    return per_layer


#: CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers per GPU, beside the tensors (measured
#: 1.0-1.4 GiB for torch 2.x on H100/H200; counted where the recipe trains on a GPU).
CONTEXT_BYTES = int(1.5 * GiB)
#: The caching allocator reserves more than it hands out (block rounding, fragmentation): a margin
#: of this share of the tensors' peak.
FRAGMENTATION = 0.05


def plan_memory(recipe: Any, *, gpus: int = 1, phase: str | None = None, config: Any = None,
                tokenizer_vocab: int | None = None, device: str | None = None) -> MemoryPlan:
    """The per-GPU memory of ``recipe`` on ``gpus`` GPUs: the peak over its phases (each phase
    trained as its engine lays it out, :meth:`Engine.memory`) and the transitions between them (a
    router warm start after Phase 1 runs forward only, once the phase's engine is freed), or of
    ``phase`` alone. Tensor rows, then the context and a fragmentation margin where the recipe
    trains on a GPU (``device``: the recipe's by default; ``"cpu"`` leaves them out)."""
    if gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}")
    config = config if config is not None else model_config(recipe, tokenizer_vocab=tokenizer_vocab)
    model, experts = meta_model(recipe, config)
    counts = _counts(model, experts)
    layout = recipe.engine.build().memory(gpus)
    on_gpu = (device or str(recipe.device)) != "cpu"
    chosen = [_phase(recipe, phase)] if phase is not None else list(recipe.phases)
    candidates: list[tuple[str, list[PlanRow]]] = []
    for each in chosen:
        candidates.append((f"phase '{each.name}'", _phase_rows(recipe, each, config, experts, counts, layout)))
        if phase is None and each.trainer.name == "expert_pretrain" and getattr(each.trainer.params, "warm_start_router", False):
            candidates.append((f"warm start after '{each.name}'", _forward_rows(recipe, each, config, experts, counts, layout)))
    totals = [(what, sum(r.bytes for r in rows)) for what, rows in candidates]
    peak_at = max(range(len(totals)), key=lambda i: totals[i][1])
    what, rows = candidates[peak_at]
    allocated = sum(r.bytes for r in rows)
    if on_gpu:
        rows = [*rows, PlanRow("context and libraries", CONTEXT_BYTES, "CUDA context, cuBLAS/cuDNN workspaces, NCCL"),
                PlanRow("allocator margin", int(FRAGMENTATION * allocated),
                        f"{FRAGMENTATION:.0%} of the tensors: the caching allocator's rounding and fragmentation")]
    notes = list(layout.notes)
    if len(totals) > 1:
        notes.append("tensors per step: " + ", ".join(
            f"{w} {t / GiB:.2f} GiB" + (" (the peak)" if i == peak_at else "") for i, (w, t) in enumerate(totals)))
    name = what.split("'")[1]
    return MemoryPlan(str(recipe.path), name, recipe.engine.name, gpus, tuple(rows), tuple(notes), peak=what)


@dataclass(frozen=True)
class _Counts:
    frozen_by_dtype: dict[Any, int]
    trainable_bytes: int
    trainable_numel: int
    buffers: int
    largest_layer: int


def _counts(model: Any, experts: Any) -> _Counts:
    trainable = {id(p) for p in experts.trainable_parameters().values()}
    frozen: dict[Any, int] = {}
    trainable_bytes = trainable_numel = 0
    for p in model.parameters():
        if id(p) in trainable:
            trainable_bytes += _nbytes(p)
            trainable_numel += p.numel()
        else:
            frozen[p.dtype] = frozen.get(p.dtype, 0) + _nbytes(p)
    return _Counts(frozen, trainable_bytes, trainable_numel, sum(_nbytes(b) for b in model.buffers()),
                   max(_nbytes_module(m) for m in experts.stack.layers))


def _weight_rows(counts: _Counts, layout: Any) -> list[PlanRow]:
    """Parameters and buffers: what every step holds, training or not."""
    shards = layout.param_shards
    kept = 0 if layout.params_offloaded else 1
    rows = [
        PlanRow(f"frozen params ({_dtype_name(d)})", kept * b // shards,
                f"{b / GiB:.2f} GiB in all" + (f", / {shards}{_scheme(layout)}" if shards > 1 else ""))
        for d, b in sorted(counts.frozen_by_dtype.items(), key=lambda kv: -kv[1])
    ]
    rows += [
        PlanRow("trainable params", kept * counts.trainable_bytes // shards, f"{counts.trainable_numel / 1e6:.1f}M fp32"),
        PlanRow("buffers", counts.buffers, "rotary tables, expert positions and CSR indices"),
    ]
    if shards > 1 and kept:
        rows.append(PlanRow("gathered layers", layout.gathered_layers * counts.largest_layer,
                            f"{layout.scheme + ': ' if layout.scheme else ''}{layout.gathered_layers} decoder layers "
                            "whole at once (in use, prefetched)"))
    return rows


def _phase_rows(recipe: Any, phase: Any, config: Any, experts: Any, counts: _Counts, layout: Any) -> list[PlanRow]:
    numel, optimizer_kept = counts.trainable_numel, 0 if layout.optimizer_offloaded else 1
    rows = _weight_rows(counts, layout)
    rows.append(PlanRow("gradients", counts.trainable_bytes // layout.grad_shards,
                        f"/ {layout.grad_shards}{_scheme(layout)}" if layout.grad_shards > 1 else "one per trainable"))
    if layout.gradient_copies:
        rows.append(PlanRow("gradient buckets", layout.gradient_copies * counts.trainable_bytes,
                            "the data-parallel engine's communication buckets"))
    rows.append(PlanRow("optimiser state", optimizer_kept * ADAM_MOMENTS * 4 * numel // layout.optimizer_shards,
                        "AdamW, 2 x fp32" + (f", / {layout.optimizer_shards}" if layout.optimizer_shards > 1 else "")))
    if layout.master_copy:
        rows.append(PlanRow("master copy", optimizer_kept * 4 * numel // layout.optimizer_shards,
                            layout.master_detail or "an fp32 copy of the trainable parameters"))
    copies = getattr(phase.trainer.params, "trainable_copies", 0)  # e.g. an RL trainer's frozen reference
    if copies:
        rows.append(PlanRow("trainer's copies", copies * counts.trainable_bytes // layout.param_shards,
                            f"{copies} x the trainable parameters, frozen (an RL phase's KL reference)"))
    rows += _activation_rows(recipe, phase, config, experts)
    transient = sum(bank.transient_bytes() for per_proj in experts.banks().values() for bank in per_proj.values())
    if transient:
        rows.append(PlanRow("selectors' buffers", transient,
                            "what the banks' selectors allocate at their peak step (a dense gradient for growth)"))
    if layout.bucket_elements:
        rows.append(PlanRow("gradient bucket", min(layout.bucket_elements, max(numel, layout.bucket_floor)) * 4,
                            layout.bucket_detail or "a flat fp32 reduce bucket"))
    return rows


def _forward_rows(recipe: Any, phase: Any, config: Any, experts: Any, counts: _Counts, layout: Any) -> list[PlanRow]:
    """A warm start after ``phase``: the weights and one micro-batch's forward, no gradients (the
    phase's engine and its optimiser state are freed before it)."""
    activations = _activation_rows(recipe, phase, config, experts)
    per_layer = activations[1].bytes  # the larger of a layer's saved state and the LM head's chunk
    return [*_weight_rows(counts, layout), PlanRow("forward", per_layer, "one micro-batch, no gradients")]


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
    base_layer = layer_activation_bytes(config, act_bytes) * tokens
    banks = bank_activation_bytes(experts, tokens)
    per_layer = base_layer + max(banks)  # the largest layer
    labelled = phase.batch_size * (recipe.data.seq_len - 1)
    lm_chunk = min(_chunk_tokens(phase) or labelled, labelled)
    # a chunk's fp32 logits, their log-softmax and gradient (the half-precision logits of autocast
    # are freed by then), and the final hidden states with their gradient
    logits = lm_chunk * vocab * 3 * 4 + 2 * tokens * hidden * act_bytes
    if recipe.model.gradient_checkpointing:
        activations = layers * tokens * hidden * act_bytes
        how = f"input of {layers} checkpointed layers"
        backward = max(logits, 2 * per_layer)  # a layer recomputed, and its backward
    else:
        activations = layers * base_layer + sum(banks)
        how = f"{layers} layers x {tokens} tokens"
        backward = max(logits, per_layer)
    what = f"max(LM loss: fp32 logits of {lm_chunk} positions x {vocab} vocab, one layer's backward)"
    return [PlanRow("activations", activations, how), PlanRow("backward peak", backward, what)]


def _scheme(layout: Any) -> str:
    """`` (ZeRO-2)``: the engine's name for its sharding, as the rows quote it."""
    return f" ({layout.scheme})" if layout.scheme else ""


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

    table = Table(title=f"{plan.recipe}: {plan.peak or 'phase ' + repr(plan.phase)}, engine {plan.engine}, "
                        f"{plan.gpus} GPU(s) — per GPU", title_justify="left")
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
