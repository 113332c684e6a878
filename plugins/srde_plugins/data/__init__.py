"""Batch samplers: `shuffled` (every epoch a new permutation of the training set; the default)."""

from __future__ import annotations

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams


@hookimpl
def srde_register(registry):
    registry.add("sampler", "shuffled", "srde_plugins.data.shuffled:ShuffledSampler", NoParams,
                 "Epoch-wise shuffled order: a new seeded permutation of the training set every epoch.")
