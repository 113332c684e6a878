"""Routing: one top-k decision per token per MLP block, and the contracts of routers.

A ``router`` component (registry kind ``router``) is a :class:`RouterType`; it builds one
:class:`Router` module per SRDE layer. A router maps the layer's input ``[T, H]`` to a
:class:`Routing`: the experts of each token, their gate weights, and the full probabilities and
logits that auxiliary losses read. The base class applies a forced assignment from the forward
context (Phase 1 expert pre-training) on top of any router's own decision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from srde_core.model.context import ForwardContext


@dataclass
class ExpertGroups:
    """Token slots grouped by expert, computed once per routing and shared by every projection.

    ``tokens[bounds[e]:bounds[e+1]]`` are the token indices routed to expert ``e`` and ``weights``
    the matching gate values (same order). ``bounds`` (``[E + 1]``, on the routing's device) is
    computed with fixed-shape ops and no host sync, so grouping traces under ``torch.compile``;
    ``offsets`` and ``counts`` are the same bounds as Python ints, read from the device on first use
    (one host sync: for kernels that loop over the experts on the host).
    """

    tokens: torch.Tensor  # [T*k] long
    weights: torch.Tensor  # [T*k] gate values, differentiable
    bounds: torch.Tensor  # [E + 1] long

    @cached_property
    def offsets(self) -> list[int]:
        return self.bounds.tolist()

    @property
    def counts(self) -> list[int]:
        offsets = self.offsets
        return [hi - lo for lo, hi in zip(offsets, offsets[1:])]

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.offsets[e], self.offsets[e + 1]
        return self.tokens[lo:hi], self.weights[lo:hi]


@dataclass
class Routing:
    """One routing decision for a flat batch of ``T`` tokens."""

    experts: torch.Tensor  # [T, k] long
    weights: torch.Tensor  # [T, k] gate weights, differentiable
    probs: torch.Tensor  # [T, E], softmax over all experts (for auxiliary losses)
    logits: torch.Tensor  # [T, E]
    num_experts: int
    _groups: ExpertGroups | None = field(default=None, repr=False)
    #: [T, k] the router's decision when a combine step applies other experts (None: ``experts``)
    chosen: torch.Tensor | None = field(default=None, repr=False)

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    @property
    def routed(self) -> torch.Tensor:
        """``[T, k]``: the experts the router chose for each token (or the context forced). A
        combine step may apply other experts (``soft_merge`` applies every expert); routing
        statistics, the load balance and the expert x domain counts read this, not ``experts``."""
        return self.experts if self.chosen is None else self.chosen

    def groups(self) -> ExpertGroups:
        """The token slots sorted by expert (stable: token order within an expert); expert ``e``'s
        slots start at the number of slots routed to experts below ``e`` (a ``searchsorted`` of
        ``0..E`` in the sorted experts)."""
        if self._groups is None:
            flat_experts = self.experts.reshape(-1)
            order = torch.argsort(flat_experts, stable=True)
            edges = torch.arange(self.num_experts + 1, device=flat_experts.device, dtype=flat_experts.dtype)
            self._groups = ExpertGroups(
                tokens=order // self.experts.shape[1],
                weights=self.weights.reshape(-1)[order],
                bounds=torch.searchsorted(flat_experts[order], edges),
            )
        return self._groups

    def with_weights(self, weights: torch.Tensor, experts: torch.Tensor | None = None, *,
                     decision: bool = False) -> Routing:
        """The same decision with new gate weights (and experts): what a combine step returns. The
        router's choice (:attr:`routed`) stays what it was, unless ``decision`` says the new
        experts are the decision (a forced assignment)."""
        if experts is None:
            experts = self.experts
        chosen = None if decision or experts is self.experts and self.chosen is None else self.routed
        return replace(self, weights=weights, experts=experts, chosen=chosen, _groups=None)

    def load(self) -> torch.Tensor:
        """Fraction of routed token slots per expert (of :attr:`routed`), ``[E]`` (no gradient;
        fixed shape, no host sync)."""
        flat = self.routed.reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        return counts.float() / max(1, flat.numel())


class Router(nn.Module, ABC):
    """Routes the ``[T, H]`` input of one SRDE layer to ``top_k`` of ``num_experts`` experts."""

    num_experts: int
    top_k: int

    @abstractmethod
    def route(self, x: torch.Tensor, context: ForwardContext) -> Routing:
        """The router's own decision for the tokens ``x``."""

    def warm_start(self, directions: torch.Tensor, sample: torch.Tensor) -> None:
        """Point expert ``e`` at ``directions[e]`` (``[E, H]``: e.g. its domain's centroid minus the
        mean hidden state), scaled on ``sample`` (``[N, H]`` inputs of this layer) so the logits
        separate the experts without saturating. Routers that cannot raise NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} has no warm start")

    def forward(self, x: torch.Tensor, context: ForwardContext | None = None, layer: int = 0) -> Routing:
        context = context if context is not None else ForwardContext()
        routing = self.route(x, context)
        forced = context.per_token(context.forced_for(layer), x.shape[0])
        if forced is None:
            return routing
        forced = forced.reshape(x.shape[0], -1).to(device=x.device, dtype=torch.long)
        # checked in eager mode only: reading the bounds is a host sync (a graph break under compile)
        if not torch.compiler.is_compiling() and forced.numel() and (
            int(forced.min()) < 0 or int(forced.max()) >= self.num_experts
        ):
            raise ValueError(f"forced experts must lie in [0, {self.num_experts})")
        weights = torch.full(forced.shape, 1.0 / forced.shape[1], device=x.device, dtype=routing.weights.dtype)
        return routing.with_weights(weights, forced, decision=True)


class RouterType(ABC):
    """A ``router`` component: builds the router of each SRDE layer."""

    @abstractmethod
    def make_router(self, hidden_size: int, num_experts: int, top_k: int, generator: torch.Generator) -> Router:
        """A router module for one layer, its parameters drawn from ``generator`` (CPU)."""
