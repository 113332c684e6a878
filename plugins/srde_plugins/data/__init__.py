"""Batch samplers: `shuffled` (a new permutation every epoch; the default) and `curriculum` (easy first).

``curriculum`` orders the training examples by the data's ``difficulty`` column and lets each step
draw from the easiest fraction ``c(t)`` (its *competence*), which grows from ``initial`` to 1 over
``warmup_epochs`` epochs of the training set: ``linear``, ``exponential`` (geometric), or
``competence`` (Platanios et al. 2019: ``c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2))``). Every batch
is a pure function of the seed, the phase and the step, so a resumed run draws exactly the same
batches.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class CurriculumParams(Params):
    strategy: Literal["linear", "exponential", "competence"] = Field(
        "competence", description="how the competence grows: linear, exponential (geometric) or competence (sqrt)"
    )
    warmup_epochs: float = Field(1.0, gt=0, description="epochs of the training set until every example is eligible")
    initial: float = Field(0.1, gt=0.0, le=1.0, description="competence at step 0: the easiest fraction eligible")


@hookimpl
def srde_register(registry):
    registry.add("sampler", "shuffled", "srde_plugins.data.shuffled:ShuffledSampler", NoParams,
                 "Epoch-wise shuffled order: a new seeded permutation of the training set every epoch.")
    registry.add("sampler", "curriculum", "srde_plugins.data.curriculum:CurriculumSampler", CurriculumParams,
                 "Easy examples first (data difficulty): linear, exponential or competence-based (Platanios 2019).")
