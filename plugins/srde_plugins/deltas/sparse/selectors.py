"""The `magnitude` and `random` position selectors (registered by :mod:`srde_plugins.deltas.sparse`).

A selector returns, for each of ``num_experts`` experts, ``count`` flat positions (row-major indices
into the ``(out, in)`` weight), unique and sorted per expert, as a LongTensor ``[num_experts, count]``
on the weight's device.
"""

from __future__ import annotations

import torch

from srde_core.model.components import Selector


def _check_request(weight: torch.Tensor, num_experts: int, count: int) -> int:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    numel = weight.numel()
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= count <= numel:
        raise ValueError(f"count must be in [1, {numel}] for a weight of shape {tuple(weight.shape)}, got {count}")
    return numel


class MagnitudeSelector(Selector):
    """The positions of the largest ``|W|``; shared by all experts or dealt out disjointly.

    Deterministic: the generator is not used. Ties in ``|W|`` are broken by ``torch.topk``.
    """

    def __init__(self, assignment: str = "shared"):
        super().__init__()
        if assignment not in ("shared", "interleaved"):
            raise ValueError(f"assignment must be 'shared' or 'interleaved', got {assignment!r}")
        self.assignment = assignment

    @classmethod
    def from_params(cls, params) -> MagnitudeSelector:
        return cls(params.assignment)

    def select(
        self, weight: torch.Tensor, num_experts: int, count: int, generator: torch.Generator
    ) -> torch.Tensor:
        numel = _check_request(weight, num_experts, count)
        magnitude = weight.detach().abs().reshape(-1).float()
        if self.assignment == "shared":
            top = torch.topk(magnitude, count, sorted=False).indices
            return torch.sort(top).values.unsqueeze(0).expand(num_experts, count).contiguous()
        total = num_experts * count
        if total > numel:
            raise ValueError(
                f"interleaved assignment needs num_experts * count = {total} distinct positions, "
                f"but the weight has only {numel}"
            )
        ranked = torch.topk(magnitude, total, sorted=True).indices  # rank order, largest first
        dealt = ranked.view(count, num_experts).t()  # row e: ranks e, e + E, e + 2E, ...
        return torch.sort(dealt, dim=1).values.contiguous()

    def extra_repr(self) -> str:
        return f"assignment={self.assignment}"


class RandomSelector(Selector):
    """Uniformly random positions, drawn independently per expert from the generator.

    Each expert's set is a uniform sample without replacement; experts may overlap. The same
    generator state gives the same positions.
    """

    #: Below this many entries, or when more than 1/4 of them are wanted, a full permutation is
    #: cheap; above it, rejection sampling avoids materialising a permutation of the whole weight.
    PERMUTATION_LIMIT = 1 << 22

    @classmethod
    def from_params(cls, params) -> RandomSelector:
        return cls()

    def select(
        self, weight: torch.Tensor, num_experts: int, count: int, generator: torch.Generator
    ) -> torch.Tensor:
        numel = _check_request(weight, num_experts, count)
        rows = [self._sample(numel, count, generator) for _ in range(num_experts)]
        return torch.stack(rows).to(weight.device)

    def _sample(self, numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        if numel <= self.PERMUTATION_LIMIT or 4 * count > numel:
            chosen = torch.randperm(numel, generator=generator, device=device)[:count]
            return torch.sort(chosen).values
        # The distinct values among i.i.d. uniform draws form a uniform random subset of their
        # size; topping up and then keeping a uniform random `count` of them stays uniform.
        chosen = torch.empty(0, dtype=torch.long, device=device)
        while chosen.numel() < count:
            extra = (count - chosen.numel()) * 5 // 4 + 16
            draws = torch.randint(0, numel, (extra,), generator=generator, device=device)
            chosen = torch.unique(torch.cat([chosen, draws]))
        if chosen.numel() > count:
            keep = torch.randperm(chosen.numel(), generator=generator, device=device)[:count]
            chosen = chosen[keep]
        return torch.sort(chosen).values
