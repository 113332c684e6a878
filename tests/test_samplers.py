"""The built-in `shuffled` sampler, and how the core shards a global batch over processes."""

from __future__ import annotations

import types

import pytest

from srde_core.data.sampler import shard
from srde_plugins.data.shuffled import ShuffledSampler

PHASE = types.SimpleNamespace(name="experts")
SAMPLER = ShuffledSampler()


def srde_batch_indices(dataset, phase, step, batch_size, seed):
    return SAMPLER.indices(dataset, phase, step, batch_size, seed)


def batches(n, batch_size, steps, seed=0):
    return [srde_batch_indices(range(n), PHASE, step, batch_size, seed) for step in range(steps)]


def test_each_epoch_visits_every_example_once():
    first_epoch = sum(batches(10, 5, 2), [])
    assert sorted(first_epoch) == list(range(10))


def test_batches_cross_epoch_boundaries_and_reshuffle():
    flat = sum(batches(10, 4, 5), [])  # 20 indices = two epochs
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]


def test_order_is_a_pure_function_of_step_and_seed():
    assert batches(50, 8, 7) == batches(50, 8, 7)
    assert srde_batch_indices(range(50), PHASE, 6, 8, 0) == batches(50, 8, 7)[6]
    assert batches(50, 8, 3, seed=1) != batches(50, 8, 3, seed=0)


def test_shards_partition_the_global_batch_in_order():
    indices = batches(50, 8, 1)[0]
    shards = [shard(indices, rank, 4) for rank in range(4)]
    assert sum(shards, []) == indices and all(len(s) == 2 for s in shards)
    with pytest.raises(ValueError, match="does not split"):
        shard(indices, 0, 3)
