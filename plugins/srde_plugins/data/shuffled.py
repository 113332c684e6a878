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
        n = len(dataset)
        start = step * batch_size
        indices: list[int] = []
        while len(indices) < batch_size:
            epoch, offset = divmod(start + len(indices), n)
            order = _epoch_order(seed, phase.name, epoch, n)
            take = min(batch_size - len(indices), n - offset)
            indices.extend(order[offset : offset + take])
        return indices
