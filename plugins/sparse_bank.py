"""The bank of the ``sparse`` delta type (registered by `sparse_delta`): E sparse deltas of one weight."""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.components import DeltaBank, DeltaType, Selector
from srde_core.model.routing import Routing
from srde_plugins.sparse_delta import SparseDeltaParams
from srde_plugins.sparse_kernels import CSRStructure, build_csr_structure, routed_sparse_delta


def position_count(density: float, out_features: int, in_features: int) -> int:
    """Positions per expert for ``density``: rounded, at least 1, at most the weight's size."""
    numel = out_features * in_features
    return min(numel, max(1, round(density * numel)))


class SparseDeltaBank(DeltaBank):
    """``E`` sparse deltas of one ``(out, in)`` weight.

    Buffers: ``positions`` ``[E, P]`` (long, flat row-major indices, sorted per expert; saved with
    the adapter) and the derived CSR index structures (not saved; rebuilt from ``positions``).
    Parameters: ``values`` and ``importance``, ``[E, P]``, aligned with ``positions``.
    """

    trainable_names = ("values", "importance")

    def __init__(
        self,
        out_features: int,
        in_features: int,
        positions: torch.Tensor,
        *,
        init_importance: float = 0.0,
        cache_inputs: bool = True,
    ):
        super().__init__()
        positions = _checked_positions(positions, out_features * in_features)
        self.num_experts = positions.shape[0]
        self.out_features = out_features
        self.in_features = in_features
        self.init_importance = init_importance
        self.cache_inputs = cache_inputs
        self.register_buffer("positions", positions)
        self.values = nn.Parameter(torch.zeros(positions.shape, dtype=torch.float32, device=positions.device))
        self.importance = nn.Parameter(
            torch.full(positions.shape, float(init_importance), dtype=torch.float32, device=positions.device)
        )
        self._register_structure()

    @property
    def count(self) -> int:
        """Positions per expert (``P``)."""
        return self.positions.shape[1]

    def effective_values(self) -> torch.Tensor:
        """``values * sigmoid(importance)``, ``[E, P]``: the non-zeros of every expert's delta."""
        return self.values * torch.sigmoid(self.importance)

    def structure(self) -> CSRStructure:
        """The CSR index structures of the current positions (on the bank's device)."""
        return CSRStructure(
            crow=self.csr_crow,
            col=self.csr_col,
            crow_t=self.csr_crow_t,
            col_t=self.csr_col_t,
            transpose_order=self.csr_transpose_order,
            out_features=self.out_features,
            in_features=self.in_features,
        )

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        groups = routing.groups()
        return routed_sparse_delta(
            x,
            self.effective_values(),
            self.structure(),
            groups.tokens,
            groups.weights,
            groups.offsets,
            cache_inputs=self.cache_inputs,
            shared=routing.scratch,
        )

    def delta_weight(self, expert: int) -> torch.Tensor:
        values = self.effective_values()[expert]
        flat = values.new_zeros(self.out_features * self.in_features)
        flat = flat.scatter(0, self.positions[expert], values)
        return flat.view(self.out_features, self.in_features)

    @torch.no_grad()
    def set_positions(self, positions: torch.Tensor) -> None:
        """Move the experts to new positions (a learned selector's new choice).

        ``positions`` must have the current shape ``[E, P]`` and be unique and sorted per
        expert. A position an expert keeps keeps its value and importance; a new position starts
        like a fresh bank (value 0, importance ``init_importance``), so the delta only loses the
        entries that were dropped. The parameters are updated in place (optimisers keep their
        references; their per-slot state is not remapped).
        """
        positions = _checked_positions(positions.to(self.positions.device), self.out_features * self.in_features)
        if positions.shape != self.positions.shape:
            raise ValueError(f"positions must have shape {tuple(self.positions.shape)}, got {tuple(positions.shape)}")
        old = self.positions
        # Both rows are sorted: searchsorted finds where each new position sat in the old row.
        slot = torch.searchsorted(old, positions).clamp_(max=old.shape[1] - 1)
        kept = torch.gather(old, 1, slot) == positions
        new_values = torch.where(kept, torch.gather(self.values, 1, slot), torch.zeros_like(self.values))
        new_importance = torch.where(
            kept, torch.gather(self.importance, 1, slot), torch.full_like(self.importance, self.init_importance)
        )
        self.values.copy_(new_values)
        self.importance.copy_(new_importance)
        self.positions.copy_(positions)
        self._rebuild_structure()

    def _register_structure(self) -> None:
        s = build_csr_structure(self.positions, self.out_features, self.in_features)
        # Derived from positions: not saved (persistent=False) and rebuilt whenever they change.
        self.register_buffer("csr_crow", s.crow, persistent=False)
        self.register_buffer("csr_col", s.col, persistent=False)
        self.register_buffer("csr_crow_t", s.crow_t, persistent=False)
        self.register_buffer("csr_col_t", s.col_t, persistent=False)
        self.register_buffer("csr_transpose_order", s.transpose_order, persistent=False)

    def _rebuild_structure(self) -> None:
        s = build_csr_structure(self.positions, self.out_features, self.in_features)
        self.csr_crow, self.csr_col = s.crow, s.col
        self.csr_crow_t, self.csr_col_t = s.crow_t, s.col_t
        self.csr_transpose_order = s.transpose_order

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Loading an adapter copies saved positions into the buffer: re-derive the CSR structure.
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
    if positions.min() < 0 or positions.max() >= numel:
        raise ValueError(f"positions must lie in [0, {numel})")
    if positions.shape[1] > 1 and bool((positions[:, 1:] <= positions[:, :-1]).any()):
        raise ValueError("positions must be unique and sorted per expert")
    return positions.contiguous()


class SparseDelta(DeltaType):
    """Builds :class:`SparseDeltaBank` s at the positions the selector picks."""

    uses_selector = True

    def __init__(self, params: SparseDeltaParams):
        self.params = params

    def make_bank(
        self,
        weight: torch.Tensor,
        num_experts: int,
        selector: Selector | None,
        generator: torch.Generator,
    ) -> SparseDeltaBank:
        if selector is None:
            raise ValueError("the sparse delta type needs a selector")
        out_features, in_features = weight.shape
        count = position_count(self.params.density, out_features, in_features)
        positions = selector.select(weight.detach(), num_experts, count, generator)
        if tuple(positions.shape) != (num_experts, count):
            raise ValueError(
                f"selector {type(selector).__name__} returned shape {tuple(positions.shape)}, "
                f"expected {(num_experts, count)}"
            )
        return SparseDeltaBank(
            out_features,
            in_features,
            positions.to(weight.device),
            init_importance=self.params.init_importance,
            cache_inputs=self.params.cache_inputs,
        )
