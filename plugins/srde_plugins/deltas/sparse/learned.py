"""Learned position selectors of the ``sparse`` delta: ``gumbel_topk`` and ``spiel``.

Both keep choosing positions while the experts train (the :class:`Selector` contract:
``entry_scale`` in every forward, ``after_step`` after every optimiser step, moves only through
``bank.set_positions``). Everything they remember is a parameter or buffer of the selector, which
the bank keeps as its submodule ``selector``: checkpoints and adapters carry it, and a resumed run
continues exactly.

Neither assumes that an entry is one weight element: they rank whatever 2-D tensor ``select`` is
given (weight magnitudes here; a grid of pooled block norms for block positions).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from srde_core.model.components import DeltaBank, Selector
from srde_plugins.deltas.sparse.kernels import build_csr_structure, sampled_gradient
from srde_plugins.deltas.sparse.selectors import _check_request


def _phase_step(at: int | float, total_steps: int) -> int:
    """``at`` as a step of the phase: an int is a step, a float a fraction of ``total_steps``."""
    return at if isinstance(at, int) else max(1, math.ceil(at * total_steps))


class GumbelTopK(Selector):
    """Differentiable top-``count`` over ``C = candidates * count`` candidate positions.

    The candidates are the ``C`` entries of largest ``|W|`` (shared by the experts; on a bank of
    blocks, the ``C`` blocks of largest norm, each scaled as a whole); the bank holds
    values at all of them, and expert ``e`` has a logit ``l[e, c]`` per candidate (initialised to
    ``|W_c| / max |W|`` over the candidates). In training each entry is multiplied by the
    straight-through Gumbel top-k mask (Gumbel top-k: Kool et al. 2019, "Stochastic Beams and
    Where to Find Them"; straight-through: Bengio et al. 2013, Jang et al. 2017)

        s = l + g,  g ~ Gumbel(0, 1) (fresh per optimiser step),   m = H + (S - stop_grad(S)),
        H = 1 on the top-``count`` of s per expert (else 0),        S = sigmoid((s - t) / tau),

    where ``t`` is the midpoint between the count-th and (count+1)-th largest ``s`` (held fixed) and
    ``tau`` follows the ``temperature`` schedule from the phase's start to ``harden_at`` (its end
    value is reached when the mask hardens): the forward uses exactly ``H``, the backward the
    sigmoid relaxation, which tends to ``H`` as ``tau -> 0``.

    The logit gradient of a candidate is its entry's gradient times its value, so a candidate whose
    value is 0 could never gain logit: with ``value_gradient = "candidates"`` (the default) the
    values' gradient passes straight through the mask, so every candidate's value learns from the
    entries' gradient whether the noise picked it or not (the forward/backward sets of Top-KAST,
    Jayakumar et al. 2020: the forward uses the chosen entries, the backward updates all
    candidates), and a useful unchosen candidate gains value, then logit. ``"chosen"``: only the
    chosen entries' values learn (the product's gradient).

    In eval the mask is the top-``count`` of ``l`` (no noise). At step ``harden_at`` the bank keeps
    only the ``count`` chosen positions per expert (``set_positions``: their values and optimiser
    state stay) and the mask is gone: from then on compute is at ``count`` entries and the eval
    output is unchanged by the move.

    The noise of step ``s`` is drawn from a generator seeded with ``seed + s`` (``seed`` drawn from
    the bank's generator): a function of the step, so micro-batches, recomputation under gradient
    checkpointing, data-parallel processes and a resumed run all see the same noise.
    """

    trainable_names = ("logits",)
    moves_entries = True

    def __init__(self, candidates: float, temperature, harden_at: int | float, value_gradient: str = "candidates"):
        super().__init__()
        self.candidates = candidates
        self.value_gradient = value_gradient
        #: read by the bank (``moves.scaled_entries``): the values' gradient passes through the mask
        self.values_through_scale = value_gradient == "candidates"
        self.temperature = temperature
        self.harden_at = harden_at
        self.count: int | None = None  # entries per expert after hardening
        self._noise: tuple[int, torch.Tensor] | None = None

    @classmethod
    def from_params(cls, params) -> GumbelTopK:
        return cls(params.candidates, params.temperature.build(), params.harden_at, params.value_gradient)

    def plan_count(self, count: int, numel: int) -> int:
        self.count = count
        return min(numel, max(count, round(self.candidates * count)))

    def select(self, weight: torch.Tensor, num_experts: int, count: int, generator: torch.Generator) -> torch.Tensor:
        _check_request(weight, num_experts, count)
        self.count = count if self.count is None else min(self.count, count)
        magnitude = weight.detach().abs().reshape(-1).float()
        candidates = torch.sort(torch.topk(magnitude, count, sorted=False).indices).values
        scores = magnitude[candidates]
        logits = (scores / scores.max().clamp_min(torch.finfo(scores.dtype).tiny)).expand(num_experts, count)
        self.logits = nn.Parameter(logits.contiguous().to(weight.device))
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        self.register_buffer("seed", seed.cpu())
        self.register_buffer("progress", torch.zeros(2, dtype=torch.long))  # steps done, phase steps
        return candidates.to(weight.device).expand(num_experts, count).contiguous()

    def hardened(self, bank: DeltaBank) -> bool:
        return bank.selection_positions().shape[1] <= self.count

    def gumbel(self, step: int) -> torch.Tensor:
        """The Gumbel noise of optimiser step ``step`` (0-based), ``[E, C]``."""
        if self._noise is None or self._noise[0] != step:
            generator = torch.Generator().manual_seed(int(self.seed) + step)
            exponential = torch.empty(self.logits.shape, dtype=torch.float64).exponential_(generator=generator)
            self._noise = (step, -torch.log(exponential.clamp_min(1e-300)))
        return self._noise[1].to(self.logits.device, self.logits.dtype)

    def entry_scale(self, bank: DeltaBank) -> torch.Tensor | None:
        if self.hardened(bank):
            return None
        if not self.training:
            top = torch.topk(self.logits.detach(), self.count, dim=1).indices
            return torch.zeros_like(self.logits).scatter_(1, top, 1.0)
        step, total = self.progress.tolist()
        harden = _phase_step(self.harden_at, max(total, 1))  # the schedule spans the steps up to hardening
        tau = self.temperature.value(min(step, harden), harden)
        perturbed = self.logits + self.gumbel(step)
        ranked = torch.topk(perturbed.detach(), self.count + 1, dim=1)
        hard = torch.zeros_like(self.logits).scatter_(1, ranked.indices[:, : self.count], 1.0)
        threshold = ranked.values[:, -2:].mean(1, keepdim=True)
        soft = torch.sigmoid((perturbed - threshold) / tau)
        return hard + (soft - soft.detach())

    @torch.no_grad()
    def after_step(self, bank: DeltaBank, step: int, total_steps: int, dist) -> None:
        self.progress.copy_(torch.tensor([step, total_steps]))
        if self.hardened(bank) or step < _phase_step(self.harden_at, total_steps):
            return
        top = torch.topk(self.logits, self.count, dim=1).indices
        bank.set_positions(torch.sort(torch.gather(bank.selection_positions(), 1, top), dim=1).values)

    def extra_repr(self) -> str:
        return (f"candidates={self.candidates}, count={self.count}, harden_at={self.harden_at}, "
                f"value_gradient={self.value_gradient}")


class SpIEL(Selector):
    """Drop-and-grow (SpIEL, Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language
    Models"; the drop rule of RigL, Evci et al. 2020): entries move to where the gradient is large.

    The entries start where the ``start`` selector puts them. After every ``every``-th optimiser
    step, up to step ``until`` (a fraction of the phase, or a step), each expert drops the
    ``n = round(fraction * P)`` entries of smallest magnitude ``|phi|`` (phi: the entry of the
    delta, ``value * sigmoid(importance)``, i.e. how far training has moved that weight), and grows
    ``n`` entries at positions it does not own where the gradient of its delta is largest,

        |G_e| = |sum over e's tokens t of w_t g_t x_t^T|        (w_t: gate weight, g_t = dL/dy_t),

    measured through a forward hook on the bank and a gradient hook on its output (micro-batches
    summed, then over processes). ``grow`` says where ``G_e`` is measured:

    - ``"candidates"`` (SpIEL-AG, the default): ``candidates * n`` positions per expert not owned,
      where ``G_e`` is accumulated over every step of a window (from the first step after an update
      to the next update); memory ``[E, C]`` for the accumulation. ``pool`` says how the
      candidates are chosen, once per window:

      - ``"gradient"`` (the default, as SpIEL-AG and its reference code do): the positions of
        largest ``|G_e|`` in the window's first step (an ``[E, out, in]`` buffer during that one
        step; that step's gradient is the first term of the accumulated sum);
      - ``"uniform"``: drawn uniformly at random after each update (from a seed, so every process
        and a resumed run draw the same); no dense buffer at any step, so it scales to any weight,
        but at low density the pool covers little of the weight and growth is close to random.
    - ``"dense"``: every position, in the update step only; exact, but an ``[E, out, in]`` buffer
      during that step (small models).

    New entries start at value 0 (``set_positions``), so a move leaves the delta unchanged apart
    from the dropped entries. On a bank of blocks the same happens a block at a time: the magnitude
    of a block is the norm of its entries, its gradient score the Frobenius norm of ``G_e`` over the
    block (``bank.selection_entries`` / ``bank.selection_scores``).
    """

    moves_entries = True

    def __init__(self, start: Selector, every: int, fraction: float, until: int | float, grow: str = "candidates",
                 candidates: float = 4.0, pool: str = "gradient"):
        super().__init__()
        self.start = start
        self.every = every
        self.fraction = fraction
        self.until = until
        self.grow = grow
        self.candidates = candidates
        self.pool_choice = pool
        # this step's dense [E, out, in] gradient: grow = "dense" in an update step, pool = "gradient"
        # in the first step of a window
        self._gradient: torch.Tensor | None = None
        self._pool_structure = None  # grow = "candidates": the CSR structure of the pool's entries
        # this process's sum of the current step; added, summed over processes, to ``pool_gradient``
        # after the step, so the saved buffer is the global sum on every process (exact resume)
        self._local_gradient: torch.Tensor | None = None

    @classmethod
    def from_params(cls, params) -> SpIEL:
        return cls(params.start.build(), params.every, params.fraction, params.until, params.grow, params.candidates,
                   params.pool)

    def select(self, weight: torch.Tensor, num_experts: int, count: int, generator: torch.Generator) -> torch.Tensor:
        positions = self.start.select(weight, num_experts, count, generator)
        self.register_buffer("progress", torch.zeros(2, dtype=torch.long))  # steps done, phase steps
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        self.register_buffer("seed", seed.cpu())
        return positions

    def moves(self, count: int, cells: int) -> int:
        """Entries each expert moves per update, of ``count`` owned in a grid of ``cells``."""
        return min(round(self.fraction * count), cells - count)

    def bind(self, bank: DeltaBank) -> None:
        if self.grow == "candidates":
            positions = bank.selection_positions()
            cells = _grid_cells(bank)
            size = min(max(1, round(self.candidates * max(1, self.moves(positions.shape[1], cells)))),
                       cells - positions.shape[1])
            per_cell = bank.selection_entries(positions[:1, :1]).shape[-1]
            device = positions.device
            self.register_buffer("pool", torch.zeros(positions.shape[0], max(size, 0), dtype=torch.long, device=device))
            self.register_buffer("pool_gradient", torch.zeros(positions.shape[0], max(size, 0) * per_cell, device=device))
            # whether ``pool`` holds this window's candidates (pool = "gradient" picks them in the
            # window's first step)
            self.register_buffer("pool_ready", torch.zeros((), dtype=torch.long))
            if self.pool_choice == "uniform":
                self._draw_pool(bank, window=0)
        bank.register_forward_hook(self._measure)

    def transient_bytes(self, bank: DeltaBank) -> int:
        """The dense ``[E, out, in]`` gradient (fp32) of one step: an update step's with ``grow =
        "dense"``, a window's first step's with ``pool = "gradient"``; none with a uniform pool."""
        if self.grow == "candidates" and self.pool_choice == "uniform":
            return 0
        return 4 * bank.num_experts * bank.out_features * bank.in_features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "last_values", None)  # kept by states saved when drops ranked the change
        if self.grow == "candidates" and prefix + "pool" in state_dict:
            # states saved before pools were chosen by gradient hold a drawn pool, always in use
            state_dict.setdefault(prefix + "pool_ready", torch.ones((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pool_structure = None  # the loaded pool's entries: rebuilt on first use

    def updates_at(self, step: int, total_steps: int) -> bool:
        """Whether entries move after step ``step`` (before the first step the phase length is
        unknown: 0, and only ``every`` counts)."""
        return step % self.every == 0 and (total_steps == 0 or step <= _phase_step(self.until, total_steps))

    # -- measuring the gradient -------------------------------------------------------------------

    def _measuring(self, step: int, total: int) -> str | None:
        """What optimiser step ``step + 1`` (the one being computed) measures: ``"dense"`` (the
        whole gradient), ``"pool"`` (the gradient at the pool) or None."""
        if self.grow == "dense":
            return "dense" if self.updates_at(step + 1, total) else None
        if self.pool.shape[1] == 0 or not (total == 0 or step + 1 <= _phase_step(self.until, total)):
            return None
        return "pool" if bool(self.pool_ready) else "dense"

    def _measure(self, bank: DeltaBank, args, output: torch.Tensor) -> None:
        step, total = self.progress.tolist()
        trained = any(p.requires_grad for p in bank.parameters())  # else after_step never comes
        what = self._measuring(step, total) if output.requires_grad and trained else None
        if what is None:
            return
        x, call = args[0].detach(), args[1]
        groups = call.routing.groups()

        if what == "pool":
            def accumulate(grad: torch.Tensor) -> None:
                structure, _ = self._pool_entries(bank)
                step_sum = sampled_gradient(x, grad, groups.tokens, groups.weights, groups.offsets, structure)
                # a non-finite step (skipped by on_nonfinite = "skip") must not decide the growth
                local = self._local_gradient
                if local is None:
                    local = self._local_gradient = torch.zeros_like(self.pool_gradient)
                local.add_(torch.nan_to_num(step_sum, nan=0.0, posinf=0.0, neginf=0.0).to(local.dtype))
            output.register_hook(accumulate)
            return

        def accumulate_dense(grad: torch.Tensor) -> None:
            dtype = torch.promote_types(grad.dtype, torch.float32)
            if self._gradient is None:
                self._gradient = grad.new_zeros(bank.num_experts, bank.out_features, bank.in_features, dtype=dtype)
            for e in range(bank.num_experts):
                lo, hi = groups.offsets[e], groups.offsets[e + 1]
                if hi > lo:
                    tokens = groups.tokens[lo:hi]
                    weighted = grad[tokens].to(dtype) * groups.weights[lo:hi].detach().to(dtype)[:, None]
                    self._gradient[e].addmm_(weighted.t(), x[tokens].to(dtype))

        output.register_hook(accumulate_dense)

    def _pool_entries(self, bank: DeltaBank):
        """The CSR structure of the pool's entries (sorted per expert) and, per entry of the pool
        in ``[E, C, k]`` order, its slot in that sorted order."""
        if self._pool_structure is None:
            entries = bank.selection_entries(self.pool).flatten(1)  # [E, C * k]
            ordered, order = torch.sort(entries, dim=1)
            slot = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            self._pool_structure = (build_csr_structure(ordered, bank.out_features, bank.in_features), slot)
        return self._pool_structure

    @torch.no_grad()
    def _draw_pool(self, bank: DeltaBank, window: int) -> None:
        """pool = "uniform": a fresh pool of candidate cells per expert, none owned, drawn from
        ``seed`` and ``window``."""
        self._reset_pool()
        size = self.pool.shape[1]
        if size == 0 or self.pool.is_meta:  # a model built to be measured
            return
        owned = bank.selection_positions()
        cells = _grid_cells(bank)
        generator = torch.Generator().manual_seed(int(self.seed) + 7919 * window)
        pools = [_draw_unowned(owned[e].cpu(), cells, size, generator) for e in range(owned.shape[0])]
        self.pool.copy_(torch.stack(pools).to(self.pool.device))
        self.pool_ready.fill_(1)

    def _reset_pool(self) -> None:
        self.pool_gradient.zero_()
        self.pool_ready.fill_(0)
        self._local_gradient = None
        self._pool_structure = None

    @torch.no_grad()
    def _pick_pool(self, bank: DeltaBank, gradient: torch.Tensor) -> None:
        """pool = "gradient": the cells of largest ``|G_e|`` (``gradient``: ``[E, out, in]``, summed
        over the step's micro-batches and processes) that the expert does not own; that gradient at
        the pool's entries starts the window's sum."""
        self._reset_pool()
        score = bank.selection_scores(gradient).float()  # [E, cells]
        score.scatter_(1, bank.selection_positions(), -math.inf)
        self.pool.copy_(torch.sort(torch.topk(score, self.pool.shape[1], dim=1).indices, dim=1).values)
        entries = bank.selection_entries(self.pool).flatten(1)  # [E, C * k], pool order
        _, slot = self._pool_entries(bank)
        at_pool = torch.gather(gradient.reshape(gradient.shape[0], -1), 1, entries)
        self.pool_gradient.scatter_(1, slot, torch.nan_to_num(at_pool, nan=0.0, posinf=0.0, neginf=0.0).to(self.pool_gradient.dtype))
        self.pool_ready.fill_(1)

    # -- the update ---------------------------------------------------------------------------------

    def _summed(self, gradient: torch.Tensor | None, bank: DeltaBank, dist) -> torch.Tensor | None:
        """This step's dense gradient summed over processes (every process takes part)."""
        if dist.distributed:
            if gradient is None:
                gradient = torch.zeros(bank.num_experts, bank.out_features, bank.in_features, device=bank.values.device)
            return dist.all_sum(gradient)
        return gradient

    @torch.no_grad()
    def after_step(self, bank: DeltaBank, step: int, total_steps: int, dist) -> None:
        # what this step's forwards measured (decided from the progress they saw)
        measured = self._measuring(*self.progress.tolist()) if self.grow == "candidates" else None
        self.progress.copy_(torch.tensor([step, total_steps]))
        gradient, self._gradient = self._gradient, None
        if measured == "dense":  # the window's first step: it picks the pool
            gradient = self._summed(gradient, bank, dist)
            if gradient is not None:
                self._pick_pool(bank, gradient)
        elif measured == "pool":
            local, self._local_gradient = self._local_gradient, None
            if dist.distributed or local is not None:  # every process takes part in the sum
                local = local if local is not None else torch.zeros_like(self.pool_gradient)
                self.pool_gradient.add_(dist.all_sum(local).to(self.pool_gradient.dtype))
        if not self.updates_at(step, total_steps):
            return
        positions = bank.selection_positions()
        experts, count = positions.shape
        if self.grow == "dense":
            gradient = self._summed(gradient, bank, dist)
            if gradient is None:
                return
            score = bank.selection_scores(gradient).float()  # [E, cells]
            moves = self.moves(count, score.shape[1])
        else:
            if self.pool.shape[1] == 0 or not bool(self.pool_ready):  # nowhere to grow, or nothing measured
                return
            _, slot = self._pool_entries(bank)
            per_entry = torch.gather(self.pool_gradient, 1, slot).float()  # already summed over processes
            score = per_entry.view(*self.pool.shape, -1).norm(dim=2)  # [E, C]: |G| (a block: its norm)
            moves = min(self.moves(count, _grid_cells(bank)), score.shape[1])
        if moves >= 1:
            magnitude = bank.effective_values().float()
            magnitude = magnitude.abs() if magnitude.dim() == 2 else magnitude.flatten(2).norm(dim=2)  # per block: its norm
            drop = torch.topk(magnitude, moves, dim=1, largest=False).indices
            if self.grow == "dense":
                grow = torch.topk(score.scatter_(1, positions, -math.inf), moves, dim=1).indices
            else:
                grow = torch.gather(self.pool, 1, torch.topk(score, moves, dim=1).indices)
            kept = positions[torch.ones_like(positions, dtype=torch.bool).scatter_(1, drop, False)]
            moved = torch.cat([kept.view(experts, count - moves), grow], dim=1)
            bank.set_positions(torch.sort(moved, dim=1).values)
        if self.grow == "candidates":
            if self.pool_choice == "uniform":
                self._draw_pool(bank, window=step // self.every)
            else:
                self._reset_pool()  # the next window's first step picks a new pool

    def extra_repr(self) -> str:
        pool = f", pool={self.pool_choice}" if self.grow == "candidates" else ""
        return f"every={self.every}, fraction={self.fraction}, until={self.until}, grow={self.grow}{pool}"


def _grid_cells(bank: DeltaBank) -> int:
    """The number of cells of the bank's selection grid (entries, or blocks)."""
    return bank.selection_scores(torch.empty(1, bank.out_features, bank.in_features, device="meta")).shape[1]


def _draw_unowned(owned: torch.Tensor, cells: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct cells of ``range(cells)`` not in ``owned`` (sorted), uniformly, sorted.
    A permutation for small grids; for large ones (``size`` and ``owned`` a small share) draws
    with rejection, memory proportional to ``size``."""
    free = cells - owned.numel()
    if cells <= 1 << 22 or 4 * (size + owned.numel()) > cells:
        order = torch.randperm(cells, generator=generator)
        return torch.sort(order[~torch.isin(order, owned)][:size]).values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < min(size, free):
        draw = torch.randint(0, cells, (2 * size,), generator=generator)
        chosen = _first_unique(torch.cat([chosen, draw[~torch.isin(draw, owned)]]), size)
    return torch.sort(chosen).values


def _first_unique(values: torch.Tensor, limit: int) -> torch.Tensor:
    """The first ``limit`` distinct values of ``values``, in order of first appearance."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(values.numel()), reduce="amin")
    return values[torch.sort(first).values[:limit]]
