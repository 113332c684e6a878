from __future__ import annotations

import math

import pytest

from srde_plugins.schedules import DecayParams, WarmupParams
from srde_plugins.schedules.lr import constant, warmup_cosine, warmup_linear


def test_constant_with_warmup_ramps_then_holds():
    schedule = constant(WarmupParams(warmup_steps=4), total_steps=10)
    assert [schedule(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_cosine_peaks_after_warmup_and_ends_at_min_ratio():
    schedule = warmup_cosine(DecayParams(warmup_steps=10, min_ratio=0.1), total_steps=110)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == 1.0 and schedule(10) == 1.0
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_linear_decays_linearly():
    schedule = warmup_linear(DecayParams(warmup_steps=0, min_ratio=0.0), total_steps=100)
    assert schedule(0) == 1.0 and schedule(50) == pytest.approx(0.5) and schedule(100) == 0.0


def test_warmup_longer_than_the_phase_still_reaches_the_base_lr():
    schedule = warmup_cosine(DecayParams(warmup_steps=50), total_steps=5)
    assert max(schedule(s) for s in range(5)) == 1.0


def test_schedulers_are_registered(plugins):
    assert {"constant", "warmup_cosine", "warmup_linear"} <= set(plugins.registries["scheduler"].names())
