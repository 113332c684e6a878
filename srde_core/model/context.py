"""The per-forward context: batch metadata in, routing records out.

A training step (or eval, or generation) opens a context on the attached model::

    with experts.forward_context(ForwardContext(domain_ids=batch["domain_ids"])) as ctx:
        model(**inputs)
    ctx.routings  # layer -> Routing of this forward

Every SRDE layer's router and banks see the same context. Metadata is given per example (``[B]``)
or per token (``[T]``, the flat tokens a layer sees) and read per token with :meth:`per_token`.
Routings are recorded by layer and overwritten (never appended), so the recomputation of a layer
under gradient checkpointing cannot count anything twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from srde_core.model.routing import Routing


#: The forwards the core builds a context for.
MODES = ("train", "eval", "generate")


@dataclass
class ForwardContext:
    """What a forward pass knows beyond the hidden states.

    :ivar domain_ids: the domain of each example or token (long).
    :ivar difficulty: the data's difficulty per example or token (the ``difficulty`` column: an
        integer level, higher is harder, 0 where the data gives none).
    :ivar forced_experts: experts to route to, ``[B]``/``[T]`` (one each) or ``[B, k]``/``[T, k]``,
        or a mapping from decoder layer to such a tensor (layers with different expert counts);
        routers then use these, with equal gate weights (Phase 1 expert pre-training).
    :ivar budget: the fraction of its entries a bank may use per example or token, in (0, 1]
        (dynamic sparsity); banks that cannot vary their size ignore it.
    :ivar input_ids: ``[B, S]`` the ids of the tokens this forward processes (during generation
        with a KV cache: the new tokens only).
    :ivar attention_mask: ``[B, S']`` as the model receives it (during generation it covers the
        cached tokens too, ``S' >= S``).
    :ivar mode: ``"train"``, ``"eval"`` or ``"generate"``: which forward the core built this for.
    :ivar routings: filled during the forward, decoder layer index -> :class:`Routing`.
    :ivar records: what modules record during the forward for the losses to read (a bank's
        difficulty predictions, ...), by a key the recording module chooses; overwritten, never
        appended, like the routings.
    """

    domain_ids: torch.Tensor | None = None
    difficulty: torch.Tensor | None = None
    forced_experts: torch.Tensor | Mapping[int, torch.Tensor] | None = None
    budget: torch.Tensor | None = None
    routings: dict[int, Routing] = field(default_factory=dict)
    records: dict[Any, Any] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    mode: str = "train"

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], mode: str) -> ForwardContext:
        """The context the core builds for a forward of ``batch`` (training, eval and generation
        alike): its ``input_ids``, ``attention_mask``, ``domain_ids`` and ``difficulty``, where
        present, and ``mode``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return cls(domain_ids=batch.get("domain_ids"), difficulty=batch.get("difficulty"),
                   input_ids=batch.get("input_ids"), attention_mask=batch.get("attention_mask"), mode=mode)

    def token_ids(self, num_tokens: int) -> torch.Tensor | None:
        """``[T]``: the id of each of the ``T`` flat tokens a layer sees (None without ids)."""
        return None if self.input_ids is None else self.per_token(self.input_ids.reshape(-1), num_tokens)

    def per_token(self, value: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
        """``value`` (per example ``[B, ...]`` or per token ``[T, ...]``) as one row per token.

        A layer sees the ``B * S`` tokens of a batch flattened example by example, so example
        ``b``'s row is repeated ``S`` times. None stays None.
        """
        if value is None or value.shape[0] == num_tokens:
            return value
        if num_tokens % value.shape[0]:
            raise ValueError(f"metadata for {value.shape[0]} rows does not divide {num_tokens} tokens")
        return value.repeat_interleave(num_tokens // value.shape[0], dim=0)

    def forced_for(self, layer: int) -> torch.Tensor | None:
        """The forced assignment of decoder layer ``layer`` (None: the router decides)."""
        if isinstance(self.forced_experts, Mapping):
            return self.forced_experts.get(layer)
        return self.forced_experts

    def record(self, layer: int, routing: Routing) -> None:
        self.routings[layer] = routing

    def ordered_routings(self) -> list[Routing]:
        return [self.routings[i] for i in sorted(self.routings)]


#: Every live slot, so that a checkpointed layer's recomputation can re-enter the contexts its
#: forward ran in (see :func:`checkpoint_context_fn`).
_LIVE_SLOTS: weakref.WeakSet[ContextSlot] = weakref.WeakSet()


class ContextSlot:
    """Holds the context of the forward in progress; one slot is shared by a model's SRDE layers."""

    def __init__(self) -> None:
        self.current: ForwardContext | None = None
        _LIVE_SLOTS.add(self)

    @contextmanager
    def using(self, context: ForwardContext) -> Iterator[ForwardContext]:
        previous, self.current = self.current, context
        try:
            yield context
        finally:
            self.current = previous


@contextmanager
def _reenter(contexts: list[tuple[ContextSlot, ForwardContext]]) -> Iterator[None]:
    with ExitStack() as stack:
        for slot, context in contexts:
            stack.enter_context(slot.using(context))
        yield


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint`` (non-reentrant): the recomputation
    of a checkpointed layer in backward runs after the forward's context has closed, so it re-enters
    the contexts that were open when the layer ran forward (forced experts, domain ids, budgets ...);
    otherwise the recomputed layer would route differently from the forward it replays.

    Returned pair: (context for the forward, context for the recomputation)."""
    open_now = [(slot, slot.current) for slot in list(_LIVE_SLOTS) if slot.current is not None]
    return nullcontext(), _reenter(open_now)


def checkpointing_kwargs() -> dict[str, object]:
    """What SRDE passes to ``torch.utils.checkpoint.checkpoint`` through transformers'
    ``activation_checkpointing_enable``: non-reentrant, re-entering the forward contexts."""
    return {"use_reentrant": False, "context_fn": checkpoint_context_fn}
