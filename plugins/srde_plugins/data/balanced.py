"""The ``domain_balanced`` sampler (registered by :mod:`srde_plugins.data`)."""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from srde_core.data.groups import group_rows
from srde_core.data.sampler import Sampler
from srde_core.errors import DataError


@lru_cache(maxsize=32)  # an epoch of each of a few dozen groups: every step visits every group
def _group_epoch(seed: int, phase_name: str, value: str, epoch: int, n: int) -> np.ndarray:
    """Group ``value``'s row positions in the order of its ``epoch``-th pass."""
    order = list(range(n))
    random.Random(f"{seed}:{phase_name}:{value}:{epoch}").shuffle(order)
    return np.asarray(order, dtype=np.int64)


def _before(n: int, j: int, groups: int) -> int:
    """How many of the slots ``0 .. n-1``, dealt to the groups in turn, go to group ``j``."""
    return max(0, (n - j + groups - 1) // groups)


class DomainBalancedSampler(Sampler):
    """Every global batch takes the same number of examples from each group (``batch_size // G``
    of the ``G`` groups); the ``batch_size % G`` left over go to the groups in turn, continuing
    from the previous step, so over ``G`` steps every group gets the same count.

    Group ``g``'s examples come from its rows (:func:`srde_core.data.groups.group_rows`, the cached
    per-domain shards) in an order reshuffled every epoch of that group (seeded by the seed, the
    phase, the group and the epoch). The batch lists the groups in order. Every batch is a pure
    function of its arguments, so a resumed run draws exactly the same batches.
    """

    def __init__(self, params):
        self.params = params

    def indices(self, dataset, phase, step: int, batch_size: int, seed: int) -> list[int]:
        column = self.params.column
        try:
            groups = group_rows(dataset, column)
        except KeyError:
            raise DataError(
                f"the domain_balanced sampler groups the examples by column '{column}', which the training data "
                f"lacks (columns: {', '.join(dataset.column_names)})", key=f"phases[{getattr(phase, 'index', 0)}].sampler.column",
            ) from None
        count = len(groups.values)
        each, extra = divmod(batch_size, count)
        dealt = step * extra  # left-over slots dealt to the groups before this step
        indices: list[int] = []
        for j, value in enumerate(groups.values):
            rows = groups.rows(value)
            start = step * each + _before(dealt, j, count)
            take = each + _before(dealt + extra, j, count) - _before(dealt, j, count)
            for position in range(start, start + take):
                epoch, offset = divmod(position, len(rows))
                indices.append(int(rows[_group_epoch(seed, phase.name, str(value), epoch, len(rows))[offset]]))
        return indices
