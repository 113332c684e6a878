"""The contracts of the pluggable SRDE parts: selectors, delta types and their banks.

A plugin registers a *factory* for one of these under a name; the factory receives the validated
params and returns an object with the methods below.

- ``delta`` factory(params) -> :class:`DeltaType`: builds one :class:`DeltaBank` per projection.
  A delta type that places its entries with a selector declares the selector as a component field
  of its params (``selector: ComponentChoice = component("selector", "magnitude")``) and builds one
  selector per bank, so a selector with parameters (learned masks) has its own per bank.
- ``selector`` factory(params) -> :class:`Selector`: which positions of a frozen weight an expert
  may change. A selector is a module: one that learns owns parameters, lists them in
  ``trainable_names``, and the bank that holds it trains and saves them.
- ``layout`` (see :mod:`srde_core.model.layout`), ``router`` (:mod:`srde_core.model.routing`) and
  ``combine`` (:mod:`srde_core.model.combine`) complete the layer.

Structure that changes during training goes through the bank: :meth:`DeltaBank.set_positions`
moves entries (and reports how parameters were remapped, so optimiser state follows them) and
:meth:`DeltaBank.set_active_fraction` masks or prunes entries (adaptive sparsity). What a bank
holds is read through the bank too: :meth:`DeltaBank.density`, :meth:`DeltaBank.active_entries` and
:meth:`DeltaBank.active_mask` (adaptive sparsity), :meth:`DeltaBank.activation_bytes` and
:meth:`DeltaBank.transient_bytes` (``srde plan``).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srde_core.model.context import ForwardContext
from srde_core.model.layout import LayerPlan, Layout  # noqa: F401  (part of this contract)
from srde_core.model.routing import Routing


class Selector(nn.Module, ABC):
    """Chooses, per expert, ``count`` flat positions of a ``(out, in)`` weight (or of the coarser
    grid a bank hands it, e.g. the block norms of a bank of blocks: positions are then blocks).

    A selector that learns keeps choosing during training. The bank that holds it (as its submodule
    ``selector``, when the selector has state) multiplies its entries by :meth:`entry_scale` in
    every forward, and after every optimiser step :meth:`after_step` may move the entries, only
    through ``bank.set_positions`` (its remaps reach the optimiser). Its state lives in parameters
    and buffers, so checkpoints and adapters carry it and a resumed run continues exactly.
    """

    #: Names of this selector's parameters that train (saved with the adapter either way).
    trainable_names: tuple[str, ...] = ()
    #: Whether :meth:`after_step` moves entries (``bank.set_positions``): an engine that cannot follow
    #: parameters that move refuses such a selector before any work.
    moves_entries: bool = False

    def plan_count(self, count: int, numel: int) -> int:
        """Told once, before :meth:`select`, that each expert should end with ``count`` of the
        weight's ``numel`` entries; returns how many it starts with (``select`` is asked for that
        many): ``count``, or more for a selector that narrows its entries down in training."""
        return count

    @abstractmethod
    def select(
        self, weight: torch.Tensor, num_experts: int, count: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Return a LongTensor ``[num_experts, count]`` of flat positions, unique and sorted per row.

        ``weight`` is the full frozen weight: under ZeRO-3 the caller gathers it first.
        """

    def bind(self, bank: DeltaBank) -> None:
        """Called once by the bank that keeps this selector (e.g. to register torch hooks on it)."""

    def transient_bytes(self, bank: DeltaBank) -> int:
        """Bytes this selector allocates at its peak step beyond its parameters and buffers (a
        gradient it accumulates for growth), for ``srde plan``; 0 by default."""
        return 0

    def entry_scale(self, bank: DeltaBank) -> torch.Tensor | None:
        """``[E, n]``: a (differentiable) multiplier of the bank's selected positions
        (``bank.selection_positions()``) in this forward, or None."""
        return None

    def after_step(self, bank: DeltaBank, step: int, total_steps: int, dist: Any) -> None:
        """Called by the core's step driver after optimiser step ``step`` (1-based: the steps done)
        of a phase of ``total_steps`` that trains ``bank`` (for every selector in
        ``bank.selectors()``), on every process (``dist``: :class:`srde_core.dist.Dist`, to agree
        on decisions)."""


#: ``gather(tensors)``: a context in which (possibly partitioned) parameters are readable in full.
Gather = Callable[[list[torch.Tensor]], AbstractContextManager]


@dataclass
class BankCall:
    """What a bank receives with its input in one forward of one SRDE layer.

    ``cache`` is shared by the projections that take the same input in this forward (gate_proj and
    up_proj): a bank may keep work there that a sibling can reuse (the sparse bank keeps the
    per-expert gathered input). It lives for one forward of one layer.

    ``weight`` and ``bias`` are the live parameters of this layer's base projection (each layer's
    own, also when layers share a bank), ``base`` its output ``x W^T + b`` (``[T, out]``). A bank
    that reads ``weight`` in its forward sets :attr:`DeltaBank.reads_weight`: the layer then
    gathers it where the engine shards it (``gather``, ZeRO-3) while the bank runs, and
    :meth:`linear` gathers it again for the backward.
    """

    routing: Routing
    context: ForwardContext
    cache: dict[str, Any] = field(default_factory=dict)
    projection: str = ""
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    base: torch.Tensor | None = None
    gather: Gather | None = None

    def linear(self, u: torch.Tensor) -> torch.Tensor:
        """``u W^T`` (``[T, in] -> [T, out]``, no bias) with the live weight, differentiable in
        ``u``; where the engine shards the weight, it is gathered again for the backward instead of
        being kept (a partitioned parameter is released after the forward)."""
        if self.gather is None:
            return F.linear(u, self.weight.to(u.dtype))
        return _GatheredLinear.apply(u, self.weight, self.gather)


class _GatheredLinear(torch.autograd.Function):
    """``u W^T`` for a frozen ``W`` that is readable only inside ``gather([W])``: the forward runs
    inside the layer's gather, the backward gathers ``W`` itself (nothing of ``W`` is saved)."""

    @staticmethod
    def forward(ctx, u, weight, gather):
        ctx.weight, ctx.gather, ctx.shape = weight, gather, tuple(weight.shape)
        return F.linear(u, weight.to(u.dtype))

    @staticmethod
    def backward(ctx, grad):
        # readable already (the engine fetched it for the base projection's own backward): use it as
        # it is; gathering it again would release it under the engine's feet
        readable = tuple(ctx.weight.shape) == ctx.shape
        with contextlib.nullcontext() if readable else ctx.gather([ctx.weight]):
            grad_u = grad @ ctx.weight.to(grad.dtype)
        return grad_u, None, None


@dataclass(frozen=True)
class Remap:
    """A bank parameter whose entries moved: entry ``[e, j, ...]`` of ``new`` continues entry
    ``[e, index[e, j], ...]`` of ``old`` (``index`` ``[E, P']``; trailing dimensions, such as a
    block's rows and columns, move together); ``index`` is -1 for a fresh entry.

    ``new`` may be ``old`` itself (updated in place) or a replacement of another size. An engine
    moves the optimiser state of ``old`` the same way (fresh entries start from zero state).
    """

    old: nn.Parameter
    new: nn.Parameter
    index: torch.Tensor


RemapListener = Callable[[list[Remap]], None]


class DeltaBank(nn.Module, ABC):
    """The experts' deltas to one projection weight ``W`` of shape ``(out, in)``.

    Subclasses call ``super().__init__()``, set ``self.num_experts``, ``self.in_features`` and
    ``self.out_features``, and list the names of their trainable parameters in ``trainable_names``
    (dotted names reach into submodules, e.g. ``selector.scores``; everything else is state).
    """

    num_experts: int
    in_features: int
    out_features: int
    trainable_names: tuple[str, ...] = ()
    #: State entries whose size may change during training (pruning, growing): loading a state of
    #: another size resizes the bank (and notifies the remap listeners) instead of failing.
    resizable_state: tuple[str, ...] = ()
    #: Whether ``forward`` traces under ``torch.compile`` (fixed shapes, no host syncs such as
    #: ``routing.groups().offsets``, no sparse tensors): the layer then compiles it into its graph.
    #: Other banks run eagerly inside a compiled layer, which compiles around them.
    compile_traceable: bool = False
    #: Whether the experts' deltas depend on the layer's base weight ``W`` (``dW_e = f(W)``, e.g.
    #: IA3-style scaling): :meth:`delta_weight` then takes ``weight=W``, the live weight of the layer
    #: it is asked for (a shared bank gives each layer its own), and the bank keeps no copy of ``W``.
    weight_dependent: bool = False
    #: Whether :meth:`forward` reads ``call.weight`` (the layer gathers it where the engine shards it).
    reads_weight: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._remap_listeners: list[RemapListener] = []

    @abstractmethod
    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        """``[T, in] -> [T, out]``: row t is ``sum_k w[t, k] * dW[experts[t, k]] @ x[t]`` with the
        experts and weights of ``call.routing``."""

    @abstractmethod
    def delta_weight(self, expert: int) -> torch.Tensor:
        """The dense ``dW`` of one expert, ``(out, in)``: for the reference path, merging and analysis.
        A bank whose size varies per token (see :meth:`token_budgets`) also takes ``budget=b``: the
        delta it applies to a token at budget ``b``; without it, the whole bank's delta. A
        :attr:`weight_dependent` bank takes ``weight=W``, the layer's live base weight."""

    def token_budgets(self, x: torch.Tensor, call: BankCall) -> torch.Tensor | None:
        """``[T]``: the fraction of its entries this bank uses for each token of its input ``x``
        (dynamic sparsity: from ``call.context.budget`` or the bank's own prediction), or None when
        every token uses the whole bank. The dense reference asks for it and materialises
        ``delta_weight(e, budget=b)`` per token."""
        return None

    def gram(self) -> torch.Tensor:
        """``[E, E]``: the inner products ``<dW_a, dW_b>`` of the experts' dense deltas
        (differentiable). Diversity losses read it; banks override it where materialising every
        dense delta would be too large."""
        flat = torch.stack([self.delta_weight(e).reshape(-1) for e in range(self.num_experts)])
        return flat @ flat.T

    def selectors(self) -> list[Selector]:
        """The selectors this bank keeps (its :class:`Selector` submodules). After every optimiser
        step of a phase that trains the bank, the core's step driver gives each its
        :meth:`Selector.after_step`."""
        return [module for module in self.children() if isinstance(module, Selector)]

    # -- structure that changes during training -------------------------------------------------

    def entry_positions(self) -> torch.Tensor | None:
        """Flat row-major positions ``[E, P]`` of the entries each expert owns; None for deltas
        without positions (dense, low-rank)."""
        return None

    def selection_positions(self) -> torch.Tensor | None:
        """``[E, n]``: what the bank's selector chose and :meth:`set_positions` takes, as flat
        positions in the grid the selector ranks: the weight's entries (the default,
        :meth:`entry_positions`) or a coarser grid (blocks of entries)."""
        return self.entry_positions()

    def selection_entries(self, cells: torch.Tensor) -> torch.Tensor:
        """``[E, n] -> [E, n, k]``: the flat weight positions of each cell of the selector's grid
        (``k = 1`` for a grid of entries, the default; ``bh * bw`` for blocks)."""
        return cells[..., None]

    def selection_scores(self, dense: torch.Tensor) -> torch.Tensor:
        """A per-entry quantity ``[E, out, in]`` (e.g. each expert's dense gradient) as magnitudes
        on the selector's grid, ``[E, n_grid]``: ``|dense|`` flattened by default; a bank that
        selects blocks gives each block's Frobenius norm."""
        return dense.abs().reshape(dense.shape[0], -1)

    # -- what the bank holds: read by plugins that act on every bank (adaptive sparsity, srde plan) --

    def density(self) -> float | None:
        """The fraction of the weight's ``out * in`` entries each expert may change, as built (its
        entries, or its blocks' entries, per expert over ``out * in``; pruning does not change it).
        None for deltas without entries (dense, low-rank, scaling): nothing to count or thin."""
        return None

    def active_entries(self) -> int | None:
        """The weight entries in use now, summed over the experts (fewer than built after
        :meth:`set_active_fraction` or :meth:`prune`); None for deltas without entries."""
        return None

    def active_mask(self) -> torch.Tensor | None:
        """``[E, P]`` bool: which of the bank's entries (or blocks) are in use, aligned with the
        leading dimensions of its per-entry parameters; None when every entry is in use. Whoever
        masks entries (adaptive sparsity) keeps the masked ones from drifting with it."""
        return None

    def activation_bytes(self, tokens: int, top_k: int, cache: dict[str, Any]) -> int:
        """Bytes this bank's forward keeps for the backward beyond the layer's own activations, for
        ``tokens`` tokens routed to ``top_k`` experts each (``srde plan``, on a bank built on the
        meta device). ``cache`` is shared by the projections that take the same input, as
        :attr:`BankCall.cache` is: what a sibling already keeps is counted once. Default 0."""
        return 0

    def transient_bytes(self) -> int:
        """Bytes the bank and its selectors allocate at their peak step beyond parameters and
        buffers (e.g. a selector's dense gradient for growth): by default the sum of
        :meth:`Selector.transient_bytes` over :meth:`selectors`."""
        return sum(selector.transient_bytes(self) for selector in self.selectors())

    @property
    def active_fraction(self) -> float:
        """The fraction of its entries the bank currently uses (1.0 unless masked or pruned)."""
        return 1.0

    def set_active_fraction(self, fraction: float) -> None:
        """Use only ``fraction`` of the entries (those that matter most, by the bank's own measure).

        :raises NotImplementedError: for banks whose size cannot change.
        """
        raise NotImplementedError(f"{type(self).__name__} has a fixed size")

    def prune(self) -> list[Remap]:
        """Drop the inactive entries for good (after :meth:`set_active_fraction`), so compute and
        memory fall with them; return the remapped parameters (also sent to the listeners).

        :raises NotImplementedError: for banks whose size cannot change.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot prune")

    def set_positions(self, positions: torch.Tensor) -> list[Remap]:
        """Move the experts' entries to ``positions`` (``[E, P']``); return the remapped parameters
        (after telling the listeners, see :meth:`add_remap_listener`).

        :raises NotImplementedError: for banks without positions.
        """
        raise NotImplementedError(f"{type(self).__name__} has no positions")

    def add_remap_listener(self, listener: RemapListener) -> None:
        """Call ``listener(remaps)`` whenever this bank's parameters are remapped (the engine's
        optimiser state follows them)."""
        self._remap_listeners.append(listener)

    def remove_remap_listener(self, listener: RemapListener) -> None:
        if listener in self._remap_listeners:
            self._remap_listeners.remove(listener)

    def notify_remap(self, remaps: list[Remap]) -> list[Remap]:
        for listener in list(self._remap_listeners):
            listener(remaps)
        return remaps


class DeltaType(ABC):
    """Builds the delta bank of one projection."""

    @abstractmethod
    def make_bank(self, weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> DeltaBank:
        """A bank of ``num_experts`` deltas for the frozen ``weight`` (``(out, in)``, gathered in
        full, of the first layer that uses the bank: layers may share it, so a bank must not keep a
        copy of ``weight`` to compute with; it reads the live one from :class:`BankCall`).
        ``generator`` (CPU) draws anything random. Under ``srde plan`` ``weight`` is on the meta
        device. The bank must start at dW = 0 so that an untrained SRDE model equals its base."""
