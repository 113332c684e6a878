"""The core's default hook implementations."""

from __future__ import annotations

import types

from srde_core.defaults import srde_batch_indices

PHASE = types.SimpleNamespace(name="experts")


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
