"""The ``curriculum`` sampler (registered by :mod:`srde_plugins.data`)."""

from __future__ import annotations

import math
import random
from functools import lru_cache

from srde_core.data.sampler import Sampler
from srde_core.errors import DataError

SCORES = "curriculum-base-loss"


@lru_cache(maxsize=4)
def _by_difficulty(key: str, difficulties: tuple[float, ...], seed: int) -> tuple[int, ...]:
    """Example indices from easiest to hardest; ties in a seeded random order."""
    tie_break = random.Random(f"{seed}:{key}:curriculum")
    jitter = [tie_break.random() for _ in difficulties]
    return tuple(sorted(range(len(difficulties)), key=lambda i: (difficulties[i], jitter[i])))


def _column(dataset) -> tuple[float, ...] | None:
    """The data's ``difficulty`` column, or None when it is missing or holds a single value."""
    if "difficulty" not in dataset.column_names:
        return None
    values = tuple(float(d) for d in dataset["difficulty"])
    return values if len(set(values)) > 1 else None


def mean_token_loss(model, batch):
    """Each row's mean next-token NLL over its labelled positions (0 for a row without any)."""
    import torch

    from srde_core.evaluate.losses import next_token_nll

    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    nll, row_of = next_token_nll(model, {**batch, "domain_ids": rows})  # positions grouped by row
    sums = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device).index_add_(0, row_of, nll.double())
    counts = torch.zeros_like(sums).index_add_(0, row_of, torch.ones_like(nll, dtype=torch.float64))
    return sums / counts.clamp_min(1)


class CurriculumSampler(Sampler):
    """Step ``s`` draws ``batch_size`` examples uniformly from the easiest ``competence(s)`` of them."""

    def __init__(self, params):
        self.params = params
        self.scores: tuple[float, ...] | None = None  # the base model's losses, when prepare computed them

    def prepare(self, run, phase) -> None:
        """With ``difficulty = "base_loss"``, or ``"auto"`` on data without a varying difficulty
        column: each training example's mean per-token loss under the base model (cached)."""
        from srde_plugins.data.scores import base_example_scores

        mode = self.params.difficulty
        if mode == "column" or (mode == "auto" and _column(run.data.train) is not None):
            self.difficulties(run.data.train)  # data without a usable column fails before the first step
            return
        loss_on = run.recipe.data.loss_on
        self.scores = tuple(base_example_scores(run, SCORES, mean_token_loss, settings={"loss_on": loss_on},
                                                batch_size=phase.batch_size))
        if len(set(self.scores)) < 2:
            raise DataError("the curriculum sampler found the same base-model loss on every training example",
                            key=f"phases[{phase.index}].sampler.difficulty")

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

    def difficulties(self, dataset) -> tuple[float, ...]:
        """Each example's difficulty: the base model's losses when prepared, else the column."""
        if self.scores is not None:
            if len(self.scores) != len(dataset):
                raise DataError(f"the curriculum's base-model losses cover {len(self.scores)} examples, "
                                f"the training data has {len(dataset)}", key="data")
            return self.scores
        column = _column(dataset)
        if column is None:
            if self.params.difficulty == "column" or "difficulty" in dataset.column_names:
                raise DataError(
                    "the curriculum sampler needs examples of different difficulty (map data.columns.difficulty, "
                    "or order by the base model's loss: sampler difficulty = \"base_loss\")",
                    key="data.columns.difficulty",
                )
            raise DataError("the curriculum sampler needs a 'difficulty' column in the training data, or the "
                            "base model's losses (computed by a run)", key="data.columns.difficulty")
        return column

    def indices(self, dataset, phase, step: int, batch_size: int, seed: int) -> list[int]:
        difficulties = self.difficulties(dataset)
        key = getattr(dataset, "_fingerprint", None) or str(len(difficulties))
        order = _by_difficulty(key, difficulties, seed)
        eligible = max(1, math.ceil(self.competence(step, batch_size, len(order)) * len(order)))
        rng = random.Random(f"{seed}:{phase.name}:{step}")
        if eligible >= batch_size:
            picks = rng.sample(range(eligible), batch_size)
        else:
            picks = [rng.randrange(eligible) for _ in range(batch_size)]
        return [order[i] for i in picks]
