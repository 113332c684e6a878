"""The bank of the ``sparse`` delta type: E sparse deltas of one weight."""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.components import BankCall, DeltaBank, DeltaType, Remap, Selector
from srde_plugins.deltas.sparse import SparseDeltaParams
from srde_plugins.deltas.sparse.block import add_importance, drop_missing_importance, make_block_bank, per_entry_importance
from srde_plugins.deltas.sparse.kernels import CSRStructure, build_csr_structure, routed_sparse_delta
from srde_plugins.deltas.sparse.moves import keep_active, move_index, move_parameters, moved, keep_selector, resize_parameters, scaled_entries, stored_rows


def position_count(density: float, out_features: int, in_features: int) -> int:
    """Positions per expert for ``density``: rounded, at least 1, at most the weight's size."""
    numel = out_features * in_features
    return min(numel, max(1, round(density * numel)))


class SparseDeltaBank(DeltaBank):
    """``E`` sparse deltas of one ``(out, in)`` weight.

    Buffers: ``positions`` ``[E, P]`` (long, flat row-major indices, sorted per expert; saved with
    the adapter), ``active`` ``[E, P]`` (bool: the entries in use, see
    :meth:`set_active_fraction`; saved) and the derived CSR index structures (int32 where they
    fit; not saved; rebuilt from ``positions``). When every expert owns the same positions (the
    ``magnitude`` selector's ``shared`` assignment) the positions and the CSR structures are
    stored once, as one row (``positions`` is then an ``[E, P]`` view of it, and the adapter
    saves ``[1, P]``; adapters saved with ``[E, P]`` load either way). Parameters: ``values``
    and ``importance``, ``[E, P]``, aligned with
    ``positions`` (``importance = "expert"``: ``[E, 1]``, one logit per expert; ``"none"``: no
    importance, the delta is the values). The selector that chose the positions is kept as the submodule ``selector``
    when it owns state (a learned selector trains and saves with the bank).
    """

    resizable_state = ("positions", "active", "values", "importance")

    def __init__(
        self,
        out_features: int,
        in_features: int,
        positions: torch.Tensor,
        *,
        init_importance: float = 0.0,
        cache_inputs: bool = True,
        selector: Selector | None = None,
        importance: str = "entry",
        built_count: int | None = None,
    ):
        super().__init__()
        positions = _checked_positions(positions, out_features * in_features)
        #: entries per expert as built (a learned selector may start with more candidates)
        self.built_count = int(built_count if built_count is not None else positions.shape[1])
        self.num_experts = positions.shape[0]
        self.out_features = out_features
        self.in_features = in_features
        self.init_importance = init_importance
        self.cache_inputs = cache_inputs
        self.register_buffer("positions", stored_rows(positions))
        self.register_buffer("active", torch.ones(positions.shape, dtype=torch.bool, device=positions.device))
        self.values = nn.Parameter(torch.zeros(positions.shape, dtype=torch.float32, device=positions.device))
        add_importance(self, importance, positions.shape, init_importance, positions.device)
        keep_selector(self, selector)
        drop_missing_importance(self)
        self._masked = False
        self._register_structure()
        if self.selector is not None:
            self.selector.bind(self)

    @property
    def positions(self) -> torch.Tensor:
        """``[E, P]``: every expert's flat positions (a view of the one stored row when shared)."""
        stored = self._buffers.get("positions")
        if stored is None:
            raise AttributeError("positions")
        if stored.shape[0] == self.num_experts:
            return stored
        view = self.__dict__.get("_positions_view")
        if view is None or view[0] is not stored:  # one view object per stored tensor: a stable identity
            view = (stored, stored.expand(self.num_experts, -1))
            self.__dict__["_positions_view"] = view
        return view[1]

    @property
    def count(self) -> int:
        """Positions per expert (``P``)."""
        return self.positions.shape[1]

    def effective_values(self) -> torch.Tensor:
        """``values * sigmoid(importance)`` times the selector's entry scale, if any (0 where
        inactive), ``[E, P]``: every expert's non-zeros."""
        values = self.weighted_values()
        scale = self.selector.entry_scale(self) if self.selector is not None else None
        if scale is not None:
            values = scaled_entries(values, scale, self.selector)
        return values * self.active if self._masked else values

    def weighted_values(self) -> torch.Tensor:
        """``values`` times ``sigmoid(importance)`` (per entry or per expert; the values alone
        without importance)."""
        return self.values if self.importance is None else self.values * torch.sigmoid(self.importance)

    def entry_positions(self) -> torch.Tensor:
        return self.positions

    def density(self) -> float:
        return self.built_count / (self.out_features * self.in_features)

    def active_entries(self) -> int:
        return int(self.active.sum()) if self._masked else self.num_experts * self.count

    def active_mask(self) -> torch.Tensor | None:
        return self.active if self._masked else None

    def activation_bytes(self, tokens: int, top_k: int, cache: dict) -> int:
        """Each expert's gathered fp32 input, kept for the backward (``cache_inputs``), once for the
        projections that share it (gate_proj, up_proj)."""
        key = ("sparse-delta-gathered", self.in_features)
        if not self.cache_inputs or key in cache:
            return 0
        cache[key] = True
        return 4 * top_k * tokens * self.in_features

    def gram(self) -> torch.Tensor:
        """``<dW_a, dW_b>`` over the positions the experts share, without dense deltas: every expert's
        values are scattered into the union of all positions (once: the union of shared positions is
        one expert's)."""
        values = self.effective_values()
        union, inverse = torch.unique(self.positions, return_inverse=True)
        if union.numel() == self.count:  # every expert owns the same positions
            return values @ values.T
        dense = values.new_zeros(self.num_experts, union.numel()).scatter(1, inverse, values)
        return dense @ dense.T

    @property
    def active_fraction(self) -> float:
        return float(self.active.float().mean()) if self._masked else 1.0

    @torch.no_grad()
    def set_active_fraction(self, fraction: float) -> None:
        """Keep, per expert, the ``round(fraction * P)`` entries of largest
        ``sigmoid(importance) * |value|`` (at least one) and mask the others to zero.

        Masked entries keep their parameters (a larger fraction later brings them back) and get
        no gradient. 1.0 removes the mask.
        """
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if fraction >= 1.0:
            self.active.fill_(True)
            self._masked = False
            return
        keep = max(1, round(fraction * self.count))
        score = self.weighted_values().abs()
        top = torch.topk(score, keep, dim=1).indices
        self.active.zero_()
        self.active.scatter_(1, top, True)
        self._masked = True

    def structure(self) -> CSRStructure:
        """The CSR index structures of the current positions (on the bank's device)."""
        return CSRStructure(
            **{name: getattr(self, f"csr_{name}").expand(self.num_experts, -1) for name in CSRStructure.INDEX_FIELDS},
            out_features=self.out_features,
            in_features=self.in_features,
        )

    @torch.no_grad()
    def prune(self) -> list[Remap]:
        """Keep only the active entries (every expert keeps the same number after
        :meth:`set_active_fraction`): the kernels then do proportionally less work."""
        if not self._masked:
            return []
        return self.set_positions(keep_active(self.active, self.positions))

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        groups = call.routing.groups()
        return routed_sparse_delta(
            x,
            self.effective_values(),
            self.structure(),
            groups.tokens,
            groups.weights,
            groups.offsets,
            cache_inputs=self.cache_inputs,
            shared=call.cache,
        )

    def delta_weight(self, expert: int) -> torch.Tensor:
        values = self.effective_values()[expert]
        flat = values.new_zeros(self.out_features * self.in_features)
        flat = flat.scatter(0, self.positions[expert], values)
        return flat.view(self.out_features, self.in_features)

    @torch.no_grad()
    def set_positions(self, positions: torch.Tensor) -> list[Remap]:
        """Move the experts to new positions ``[E, P']`` (unique and sorted per expert; ``P'`` may
        differ from the current count: growing or pruning).

        A position an expert keeps keeps its value, importance and active flag; a new position
        starts like a fresh bank (value 0, importance ``init_importance``, active), so the delta
        only loses the entries that were dropped. With the same count the parameters are updated
        in place; with another count they are replaced. Either way the returned remaps (also sent
        to the listeners) say where each entry came from, so optimiser state follows it.
        """
        positions = _checked_positions(positions.to(self.positions.device), self.out_features * self.in_features)
        if positions.shape[0] != self.num_experts:
            raise ValueError(f"positions must have {self.num_experts} rows, got {tuple(positions.shape)}")
        index = move_index(self.positions, positions)
        new_active = moved(self.active, index, True)
        remaps = move_parameters(self, index, {"values": 0.0} | per_entry_importance(self))
        self.positions = stored_rows(positions)
        self.active = new_active
        self._masked = not bool(new_active.all())
        self._rebuild_structure()
        return self.notify_remap(remaps)

    @torch.no_grad()
    def _resize(self, count: int) -> None:
        remaps = resize_parameters(self, count, ("values", *per_entry_importance(self)))
        self.positions = torch.arange(count, device=self.positions.device)[None]  # overwritten by the load
        self.active = torch.ones(self.num_experts, count, dtype=torch.bool, device=self.positions.device)
        self.notify_remap(remaps)

    def _register_structure(self) -> None:
        s = build_csr_structure(self.positions, self.out_features, self.in_features)
        # Derived from positions: not saved (persistent=False) and rebuilt whenever they change;
        # a structure shared by all experts is stored as its one row.
        for name in CSRStructure.INDEX_FIELDS:
            self.register_buffer(f"csr_{name}", stored_rows(getattr(s, name)), persistent=False)

    def _rebuild_structure(self) -> None:
        s = build_csr_structure(self.positions, self.out_features, self.in_features)
        for name in CSRStructure.INDEX_FIELDS:
            setattr(self, f"csr_{name}", stored_rows(getattr(s, name)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "positions")
        if saved is not None and saved.dim() == 2 and saved.shape[0] in (1, self.num_experts):
            if saved.shape[1] != self.count:
                # a pruned (or grown) bank: take the saved size first; optimiser state follows via remap
                self._resize(saved.shape[1])
            # [E, P] (older adapters, or experts with their own positions) or [1, P] (shared):
            # stored once when the rows agree; the buffer takes the saved form before the copy.
            saved = stored_rows(saved.expand(self.num_experts, -1))
            state_dict[prefix + "positions"] = saved
            self.positions = torch.empty(saved.shape, dtype=torch.long, device=self._buffers["positions"].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Loading an adapter copies saved positions into the buffer: re-derive the CSR structure.
        self._masked = not bool(self.active.all())
        self._rebuild_structure()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, "
            f"positions={self.count}"
        )


def _checked_positions(positions: torch.Tensor, numel: int) -> torch.Tensor:
    if positions.dim() != 2 or positions.shape[0] < 1 or positions.shape[1] < 1:
        raise ValueError(f"positions must be a non-empty [experts, count] tensor, got {tuple(positions.shape)}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be integers, got {positions.dtype}")
    positions = positions.long()
    if positions.is_meta:  # shapes only
        return positions
    if positions.min() < 0 or positions.max() >= numel:
        raise ValueError(f"positions must lie in [0, {numel})")
    if positions.shape[1] > 1 and bool((positions[:, 1:] <= positions[:, :-1]).any()):
        raise ValueError("positions must be unique and sorted per expert")
    return positions.contiguous()


def select_positions(selector: Selector, weight: torch.Tensor, num_experts: int, density: float,
                     generator: torch.Generator) -> torch.Tensor:
    """The ``[E, P]`` positions ``selector`` picks in ``weight`` at ``density`` (the count the selector
    asks to start with, see ``Selector.plan_count``), on the weight's device. On the meta device (a
    model built to be measured, not run) a placeholder of the right shape: one row expanded when
    the experts share their positions."""
    out_features, in_features = weight.shape
    count = selector.plan_count(position_count(density, out_features, in_features), out_features * in_features)
    if weight.is_meta:
        if selector.moves_entries:
            selector.select(weight, num_experts, count, generator)  # a learned selector's state (its shapes count)
        shared = getattr(selector, "assignment", None) == "shared"
        positions = torch.empty(1 if shared else num_experts, count, dtype=torch.long, device="meta")
        return positions.expand(num_experts, count)
    positions = selector.select(weight.detach(), num_experts, count, generator)
    if tuple(positions.shape) != (num_experts, count):
        raise ValueError(
            f"selector {type(selector).__name__} returned shape {tuple(positions.shape)}, expected {(num_experts, count)}"
        )
    return positions.to(weight.device)


class SparseDelta(DeltaType):
    """Builds :class:`SparseDeltaBank` s at the positions their selector picks (one selector per bank)."""

    def __init__(self, params: SparseDeltaParams):
        self.params = params

    def make_bank(self, weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> DeltaBank:
        selector = self.params.selector.build()
        if tuple(self.params.block) != (1, 1):
            return make_block_bank(self.params, selector, weight, num_experts, generator)
        out_features, in_features = weight.shape
        return SparseDeltaBank(
            out_features,
            in_features,
            select_positions(selector, weight, num_experts, self.params.density, generator),
            init_importance=self.params.init_importance,
            cache_inputs=self.params.cache_inputs,
            selector=selector,
            importance=self.params.importance,
            built_count=position_count(self.params.density, out_features, in_features),
        )
