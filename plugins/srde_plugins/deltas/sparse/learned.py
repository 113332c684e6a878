"""Learned position selectors of the ``sparse`` delta: ``gumbel_topk`` and ``spiel``.

Both keep choosing positions while the experts train (the :class:`Selector` contract:
``entry_scale`` in every forward, ``after_step`` after every optimiser step, moves only through
``bank.set_positions``). Everything they remember is a parameter or buffer of the selector, which
the bank keeps as its submodule ``selector``: checkpoints and adapters carry it, and a resumed run
continues exactly. :func:`step_selectors` is what the package's ``srde_after_step`` hook calls.

Neither assumes that an entry is one weight element: they rank whatever 2-D tensor ``select`` is
given (weight magnitudes here; a grid of pooled block norms for block positions).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from srde_core.model.components import DeltaBank, Selector
from srde_plugins.deltas.sparse.selectors import _check_request


def step_selectors(banks, step: int, total_steps: int, dist) -> None:
    """Give every trained bank's selector its ``after_step`` (``banks``: key -> projection -> bank)."""
    for per_proj in banks.values():
        for bank in per_proj.values():
            selector = getattr(bank, "selector", None)
            if isinstance(selector, Selector) and any(p.requires_grad for p in bank.parameters()):
                selector.after_step(bank, step, total_steps, dist)


def _phase_step(at: int | float, total_steps: int) -> int:
    """``at`` as a step of the phase: an int is a step, a float a fraction of ``total_steps``."""
    return at if isinstance(at, int) else max(1, math.ceil(at * total_steps))


class GumbelTopK(Selector):
    """Differentiable top-``count`` over ``C = candidates * count`` candidate positions.

    The candidates are the ``C`` entries of largest ``|W|`` (shared by the experts; on a bank of
    blocks, the ``C`` blocks of largest norm, each scaled as a whole); the bank holds
    values at all of them, and expert ``e`` has a logit ``l[e, c]`` per candidate (initialised to
    ``|W_c| / max |W|`` over the candidates). In training each entry is multiplied by the
    straight-through Gumbel top-k mask

        s = l + g,  g ~ Gumbel(0, 1) (fresh per optimiser step),   m = H + (S - stop_grad(S)),
        H = 1 on the top-``count`` of s per expert (else 0),        S = sigmoid((s - t) / tau),

    where ``t`` is the midpoint between the count-th and (count+1)-th largest ``s`` (held fixed) and
    ``tau`` follows the ``temperature`` schedule: the forward uses exactly ``H``, the backward the
    sigmoid relaxation, which tends to ``H`` as ``tau -> 0``. In eval the mask is the top-``count`` of
    ``l`` (no noise). At step ``harden_at`` the bank keeps only the ``count`` chosen positions per
    expert (``set_positions``: their values and optimiser state stay) and the mask is gone: from
    then on compute is at ``count`` entries and the eval output is unchanged by the move.

    The noise of step ``s`` is drawn from a generator seeded with ``seed + s`` (``seed`` drawn from
    the bank's generator): a function of the step, so micro-batches, recomputation under gradient
    checkpointing, data-parallel processes and a resumed run all see the same noise.
    """

    trainable_names = ("logits",)

    def __init__(self, candidates: float, temperature, harden_at: int | float):
        super().__init__()
        self.candidates = candidates
        self.temperature = temperature
        self.harden_at = harden_at
        self.count: int | None = None  # entries per expert after hardening
        self._noise: tuple[int, torch.Tensor] | None = None

    @classmethod
    def from_params(cls, params) -> GumbelTopK:
        return cls(params.candidates, params.temperature.build(), params.harden_at)

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
        tau = self.temperature.value(step, max(total, 1))
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
        return f"candidates={self.candidates}, count={self.count}, harden_at={self.harden_at}"


class SpIEL(Selector):
    """Drop-and-grow (SpIEL, Ansell et al. 2024): entries move to where the gradient is large.

    The entries start where the ``start`` selector puts them. After every ``every``-th optimiser
    step, up to step ``until`` (a fraction of the phase, or a step), each expert drops the
    ``n = round(fraction * P)`` entries whose effective value changed least since the last update,
    ``|v_now - v_last|`` (new entries count from 0), and grows ``n`` entries at the positions not
    already owned where the dense gradient of its delta is largest,

        |G_e| = |sum over e's tokens t of w_t g_t x_t^T|        (w_t: gate weight, g_t = dL/dy_t),

    measured in the update step only (its micro-batches summed, then over processes), through a
    forward hook on the bank and a gradient hook on its output; the ``[E, out, in]`` buffer exists
    only during that step. New entries start at value 0 (``set_positions``), so a move leaves the
    delta unchanged apart from the dropped entries.

    On a bank of blocks the same happens a block at a time: the change of a block is the norm of
    its values' change, and its gradient score the Frobenius norm of ``G_e`` over the block
    (``bank.selection_scores``).
    """

    def __init__(self, start: Selector, every: int, fraction: float, until: int | float):
        super().__init__()
        self.start = start
        self.every = every
        self.fraction = fraction
        self.until = until
        self._gradient: torch.Tensor | None = None

    @classmethod
    def from_params(cls, params) -> SpIEL:
        return cls(params.start.build(), params.every, params.fraction, params.until)

    def select(self, weight: torch.Tensor, num_experts: int, count: int, generator: torch.Generator) -> torch.Tensor:
        positions = self.start.select(weight, num_experts, count, generator)
        self.register_buffer("progress", torch.zeros(2, dtype=torch.long))  # steps done, phase steps
        return positions

    def bind(self, bank: DeltaBank) -> None:
        # the effective values at the last update, shaped as the bank's values ([E, P], or
        # [E, nb, bh, bw] for blocks)
        self.register_buffer("last_values", torch.zeros(bank.values.shape, dtype=torch.float32, device=bank.values.device))
        bank.register_forward_hook(self._measure)

    def updates_at(self, step: int, total_steps: int) -> bool:
        """Whether entries move after step ``step`` (before the first step the phase length is
        unknown: 0, and only ``every`` counts)."""
        return step % self.every == 0 and (total_steps == 0 or step <= _phase_step(self.until, total_steps))

    def _measure(self, bank: DeltaBank, args, output: torch.Tensor) -> None:
        step, total = self.progress.tolist()
        trained = any(p.requires_grad for p in bank.parameters())  # else after_step never comes
        if not (output.requires_grad and trained and self.updates_at(step + 1, total)):
            return
        x, call = args[0].detach(), args[1]
        groups = call.routing.groups()

        def accumulate(grad: torch.Tensor) -> None:
            dtype = torch.promote_types(grad.dtype, torch.float32)
            if self._gradient is None:
                self._gradient = grad.new_zeros(bank.num_experts, bank.out_features, bank.in_features, dtype=dtype)
            for e in range(bank.num_experts):
                lo, hi = groups.offsets[e], groups.offsets[e + 1]
                if hi > lo:
                    tokens = groups.tokens[lo:hi]
                    weighted = grad[tokens].to(dtype) * groups.weights[lo:hi].detach().to(dtype)[:, None]
                    self._gradient[e].addmm_(weighted.t(), x[tokens].to(dtype))

        output.register_hook(accumulate)

    @torch.no_grad()
    def after_step(self, bank: DeltaBank, step: int, total_steps: int, dist) -> None:
        self.progress.copy_(torch.tensor([step, total_steps]))
        gradient, self._gradient = self._gradient, None
        if not self.updates_at(step, total_steps) or gradient is None:
            return
        positions = bank.selection_positions()
        experts, count = positions.shape
        score = bank.selection_scores(dist.all_sum(gradient)).float()  # [E, grid]
        moves = min(round(self.fraction * count), score.shape[1] - count)
        if moves < 1:
            return
        change = bank.effective_values().float() - self.last_values
        change = change.abs() if change.dim() == 2 else change.flatten(2).norm(dim=2)  # per block: its norm
        drop = torch.topk(change, moves, dim=1, largest=False).indices
        grow = torch.topk(score.scatter_(1, positions, -math.inf), moves, dim=1).indices
        kept = positions[torch.ones_like(positions, dtype=torch.bool).scatter_(1, drop, False)]
        moved = torch.cat([kept.view(experts, count - moves), grow], dim=1)
        bank.set_positions(torch.sort(moved, dim=1).values)
        self.last_values.copy_(bank.effective_values())

    def extra_repr(self) -> str:
        return f"every={self.every}, fraction={self.fraction}, until={self.until}"
