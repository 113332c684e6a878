"""The ``curriculum`` sampler (registered by :mod:`srde_plugins.data`)."""

from __future__ import annotations

import math
import random
from functools import lru_cache

from srde_core.data.sampler import Sampler
from srde_core.errors import DataError


@lru_cache(maxsize=4)
def _by_difficulty(key: str, difficulties: tuple[int, ...], seed: int) -> tuple[int, ...]:
    """Example indices from easiest to hardest; ties in a seeded random order."""
    tie_break = random.Random(f"{seed}:{key}:curriculum")
    jitter = [tie_break.random() for _ in difficulties]
    return tuple(sorted(range(len(difficulties)), key=lambda i: (difficulties[i], jitter[i])))


class CurriculumSampler(Sampler):
    """Step ``s`` draws ``batch_size`` examples uniformly from the easiest ``competence(s)`` of them."""

    def __init__(self, params):
        self.params = params

    def competence(self, step: int, batch_size: int, dataset_size: int) -> float:
        p = self.params
        t = min(1.0, step * batch_size / (p.warmup_epochs * dataset_size))
        c0 = p.initial
        if p.strategy == "linear":
            value = c0 + (1.0 - c0) * t
        elif p.strategy == "exponential":
            value = c0 * (1.0 / c0) ** t
        else:
            value = math.sqrt(t * (1.0 - c0 * c0) + c0 * c0)
        return min(1.0, value)

    def metrics(self, step: int, batch_size: int, dataset_size: int) -> dict[str, float]:
        return {"competence": self.competence(step, batch_size, dataset_size)}

    def indices(self, dataset, phase, step: int, batch_size: int, seed: int) -> list[int]:
        if "difficulty" not in dataset.column_names:
            raise DataError("the curriculum sampler needs a 'difficulty' column in the training data", key="data.columns.difficulty")
        difficulties = tuple(int(d) for d in dataset["difficulty"])
        if len(set(difficulties)) < 2:
            raise DataError(
                "the curriculum sampler needs examples of different difficulty (map data.columns.difficulty)",
                key="data.columns.difficulty",
            )
        key = getattr(dataset, "_fingerprint", None) or str(len(difficulties))
        order = _by_difficulty(key, difficulties, seed)
        eligible = max(1, math.ceil(self.competence(step, batch_size, len(order)) * len(order)))
        rng = random.Random(f"{seed}:{phase.name}:{step}")
        if eligible >= batch_size:
            picks = rng.sample(range(eligible), batch_size)
        else:
            picks = [rng.randrange(eligible) for _ in range(batch_size)]
        return [order[i] for i in picks]
