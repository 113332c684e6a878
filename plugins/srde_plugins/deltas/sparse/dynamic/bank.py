"""The bank of the ``dynamic_sparse`` delta type: a sparse bank whose tokens use budgeted subsets.

A :class:`DynamicSparseDeltaBank` is a :class:`SparseDeltaBank` (positions, ``values``,
``importance``, masking and pruning unchanged) plus

- a ranking: per expert, the entries in order of priority ``sigmoid(importance) * |value|``
  (descending), recomputed without gradient when the parameters have changed ``refresh_every``
  times (optimiser updates; any change of the positions re-ranks at once);
- per level ``l``, the top ``n_l`` entries of each expert in position order and their CSR
  structure (built once per ranking);
- a difficulty head ``Linear(in, 1)`` on the bank's input, zero at start.

Forward: each token's level (from the context's budget, else from the head), then one call of the
sparse kernel per level that has tokens, with that level's values and structure.
"""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.components import BankCall, DeltaType, Selector
from srde_plugins.deltas.sparse.bank import SparseDeltaBank, position_count, select_positions
from srde_plugins.deltas.sparse.kernels import CSRStructure, build_csr_structure, routed_sparse_delta
from srde_plugins.deltas.sparse.dynamic import DynamicSparseParams

#: Key of a bank's head logits in ``ForwardContext.records``: ``(DIFFICULTY_RECORD, bank)``.
DIFFICULTY_RECORD = "difficulty-logits"


class DynamicSparseDeltaBank(SparseDeltaBank):
    """``E`` sparse deltas of one ``(out, in)`` weight with ``len(densities)`` per-token budgets.

    ``positions`` ``[E, P]`` are the entries at the highest density; ``densities`` (ascending) give
    each level's entry count ``min(P, max(1, round(d * out * in)))``. The budget of level ``l`` is
    the fraction ``n_l / P`` of the bank's entries.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        positions: torch.Tensor,
        *,
        densities: tuple[float, ...],
        refresh_every: int = 1,
        init_importance: float = 0.0,
        cache_inputs: bool = True,
        selector: Selector | None = None,
    ):
        super().__init__(
            out_features, in_features, positions,
            init_importance=init_importance, cache_inputs=cache_inputs, selector=selector,
        )
        if not densities or list(densities) != sorted(densities):
            raise ValueError(f"densities must be a non-empty ascending sequence, got {densities}")
        self.densities = tuple(float(d) for d in densities)
        self.refresh_every = refresh_every
        self.head = nn.Linear(in_features, 1, device=positions.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.trainable_names = self.trainable_names + ("head.weight", "head.bias")
        self._levels: list[tuple[torch.Tensor, CSRStructure]] | None = None
        self._ranked_positions: tuple | None = None  # what the ranking was computed for
        self._seen_parameters: tuple | None = None
        self._updates = 0

    # -- levels -------------------------------------------------------------------------------

    def level_counts(self) -> list[int]:
        """Entries per expert at each level (ascending; the last is at most ``P``)."""
        return [min(self.count, position_count(d, self.out_features, self.in_features)) for d in self.densities]

    def level_fractions(self) -> torch.Tensor:
        """``[levels]`` float32: the budget of each level, ``n_l / P``."""
        return torch.tensor([n / self.count for n in self.level_counts()], dtype=torch.float32)

    def level_of(self, budget: torch.Tensor) -> torch.Tensor:
        """``[T]`` long: for each budget (a fraction of the bank's entries), the largest level whose
        fraction does not exceed it (level 0 for smaller budgets). Compared in float32."""
        fractions = self.level_fractions().to(budget.device)
        level = torch.searchsorted(fractions, budget.to(torch.float32).contiguous(), right=True) - 1
        return level.clamp_(min=0)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[T]``: the difficulty head's logit per token, on the detached input (the head learns to
        read the hidden state; its loss does not reshape the model)."""
        return self.head(x.detach().to(self.head.weight.dtype)).squeeze(-1)

    def token_levels(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        """``[T]`` long: each token's level, from ``call.context.budget`` or else the head (whose
        logits are recorded in the context for the ``difficulty`` loss)."""
        context = call.context
        budget = context.per_token(context.budget, x.shape[0]) if context is not None else None
        if budget is not None:
            return self.level_of(budget.reshape(-1).to(x.device))
        logits = self.head_logits(x)
        if context is not None:
            context.records[(DIFFICULTY_RECORD, self)] = logits
        last = len(self.densities) - 1
        return torch.round(torch.sigmoid(logits.detach()) * last).long()

    def token_budgets(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        return self.level_fractions().to(x.device)[self.token_levels(x, call)]

    @torch.no_grad()
    def ranked_levels(self) -> list[tuple[torch.Tensor, CSRStructure]]:
        """Per level: the indices ``[E, n_l]`` (into ``P``, ascending: position order) of each
        expert's top-``n_l`` entries by priority, and their CSR structure. Recomputed when the
        positions changed, or when the parameters have changed ``refresh_every`` times."""
        positions_key = (id(self.positions), self.positions._version, id(self.active), self.active._version)
        parameters_key = (id(self.values), self.values._version, id(self.importance), self.importance._version)
        if self._levels is not None and positions_key == self._ranked_positions:
            if parameters_key != self._seen_parameters:
                self._seen_parameters = parameters_key
                self._updates += 1
            if self._updates < self.refresh_every:
                return self._levels
        priority = self.effective_values().abs()  # sigmoid(importance) * |value|; masked entries last
        order = torch.argsort(priority, dim=1, descending=True, stable=True)
        levels = []
        for count in self.level_counts():
            if count == self.count:
                index = torch.arange(count, device=order.device).expand(self.num_experts, count)
                levels.append((index, self.structure()))
                continue
            index = torch.sort(order[:, :count], dim=1).values
            levels.append((index, build_csr_structure(self.positions.gather(1, index), self.out_features, self.in_features)))
        self._levels = levels
        self._ranked_positions, self._seen_parameters, self._updates = positions_key, parameters_key, 0
        return levels

    # -- the bank -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        levels = self.ranked_levels()
        token_level = self.token_levels(x, call)
        groups = call.routing.groups()
        slot_level = token_level[groups.tokens]
        slot_expert = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x.device), torch.tensor(groups.counts, device=x.device)
        )
        values = self.effective_values()
        members_of, outputs = [], []
        for level, (index, structure) in enumerate(levels):
            keep = slot_level == level
            counts = torch.bincount(slot_expert[keep], minlength=self.num_experts).tolist()
            if not sum(counts):
                continue
            offsets = [0]
            for c in counts:
                offsets.append(offsets[-1] + c)
            level_values = values if index.shape[1] == self.count else values.gather(1, index)
            members = torch.nonzero(token_level == level).squeeze(1)
            if members.numel() == x.shape[0]:  # every token at this level: no compaction needed
                return self._kernel(x, level_values, structure, groups.tokens, groups.weights, offsets)
            # Only this level's tokens go through its kernel call (their rows of x, renumbered).
            local = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
            local[members] = torch.arange(members.numel(), device=x.device)
            members_of.append(members)
            outputs.append(self._kernel(x[members], level_values, structure, local[groups.tokens[keep]], groups.weights[keep], offsets))
        if not outputs:  # no routed token
            return x.new_zeros(x.shape[0], self.out_features)
        # Every token sits in exactly one level: put the levels' rows back in token order.
        members = torch.cat(members_of)
        position = torch.empty_like(members)
        position[members] = torch.arange(members.numel(), device=x.device)
        return torch.cat(outputs).index_select(0, position)

    def _kernel(self, x, values, structure, tokens, weights, offsets) -> torch.Tensor:
        # No shared input cache: each projection buckets its tokens with its own head.
        return routed_sparse_delta(
            x, values, structure, tokens, weights, offsets, cache_inputs=self.cache_inputs, shared=None
        )

    def delta_weight(self, expert: int, budget: float | None = None) -> torch.Tensor:
        """The dense delta of ``expert``; at ``budget``, only its entries of that budget's level."""
        if budget is None:
            return super().delta_weight(expert)
        level = int(self.level_of(torch.tensor([budget]))[0])
        index = self.ranked_levels()[level][0][expert]
        flat = self.values.new_zeros(self.out_features * self.in_features)
        flat = flat.scatter(0, self.positions[expert, index], self.effective_values()[expert, index])
        return flat.view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.level_counts()}"


class DynamicSparseDelta(DeltaType):
    """Builds :class:`DynamicSparseDeltaBank` s at ``max_density`` positions from their selector."""

    def __init__(self, params: DynamicSparseParams):
        self.params = params

    def densities(self) -> tuple[float, ...]:
        p = self.params
        if p.levels == 1:
            return (p.max_density,)
        return tuple(p.min_density + (p.max_density - p.min_density) * i / (p.levels - 1) for i in range(p.levels))

    def make_bank(self, weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> DynamicSparseDeltaBank:
        selector = self.params.selector.build()
        out_features, in_features = weight.shape
        return DynamicSparseDeltaBank(
            out_features,
            in_features,
            select_positions(selector, weight, num_experts, self.params.max_density, generator),
            densities=self.densities(),
            refresh_every=self.params.refresh_every,
            init_importance=self.params.init_importance,
            cache_inputs=self.params.cache_inputs,
            selector=selector,
        )
