"""The ``shuffled`` sampler (registered by :mod:`srde_plugins.data`)."""

from __future__ import annotations

import random
from functools import lru_cache

from srde_core.data.sampler import Sampler


@lru_cache(maxsize=4)
def _epoch_order(seed: int, phase_name: str, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:{phase_name}:{epoch}").shuffle(order)
    return tuple(order)


class ShuffledSampler(Sampler):
    """Micro-batch ``step`` of a permutation reshuffled every epoch (seeded by seed, phase, epoch).

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """

    def __init__(self, params=None):
        self.params = params

    def indices(self, dataset, phase, step: int, batch_size: int, seed: int) -> list[int]:
        rows = self._rows(dataset, phase)
        n = len(dataset) if rows is None else len(rows)
        start = step * batch_size
        indices: list[int] = []
        while len(indices) < batch_size:
            epoch, offset = divmod(start + len(indices), n)
            order = _epoch_order(seed, phase.name, epoch, n)
            take = min(batch_size - len(indices), n - offset)
            indices.extend(order[offset : offset + take])
        return indices if rows is None else [int(rows[i]) for i in indices]

    def _rows(self, dataset, phase):
        """The rows of the chosen domains (ascending), or None for every row."""
        domains = list(getattr(self.params, "domains", None) or [])
        if not domains:
            return None
        import numpy as np

        from srde_core.data.groups import group_rows
        from srde_core.errors import DataError

        groups = group_rows(dataset, "domain")
        missing = [d for d in domains if d not in groups.values]
        if missing:
            raise DataError(f"no training example of domain {', '.join(map(repr, missing))} (domains: "
                            f"{', '.join(map(str, groups.values))})", key=f"phases[{getattr(phase, 'index', 0)}].sampler.domains")
        return np.sort(np.concatenate([groups.rows(d) for d in domains]))
