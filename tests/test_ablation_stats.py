"""The statistics of the ablation table (benchmarks/ablations.py) on hand-computed cases."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablations  # noqa: E402


def test_t_quantiles_from_the_table_and_beyond():
    assert ablations.t_quantile(2) == pytest.approx(4.302652730, abs=1e-9)
    assert ablations.t_quantile(4) == pytest.approx(2.776445105, abs=1e-9)
    # beyond the table: t_{0.975, 40} = 2.021075390, t_{0.975, 120} = 1.979930405
    assert ablations.t_quantile(40) == pytest.approx(2.021075390, abs=1e-5)
    assert ablations.t_quantile(120) == pytest.approx(1.979930405, abs=1e-6)
    with pytest.raises(ValueError):
        ablations.t_quantile(0)


def test_t_interval_of_three_values():
    # mean 2, sample sd 1, se 1/sqrt(3), half-width t_{0.975,2} / sqrt(3) = 2.484138
    mean, half = ablations.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652730 / math.sqrt(3), rel=1e-9)
    mean, half = ablations.t_interval([5.0])
    assert mean == 5.0 and math.isnan(half)


def test_paired_differences_and_their_interval_and_mark():
    variant = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}
    reference = {0: 0.5, 1: 1.5, 2: 3.0}
    diffs = ablations.paired_differences(variant, reference)
    assert diffs == [0.5, 0.5, 1.0]  # only the seeds both have, in seed order
    mean, half = ablations.t_interval(diffs)
    # sd of (0.5, 0.5, 1.0) = 0.288675; half-width 4.302653 * 0.288675 / sqrt(3) = 0.717109
    assert mean == pytest.approx(2 / 3) and half == pytest.approx(0.717109, abs=1e-6)
    assert not ablations.excludes_zero(mean - half, mean + half)
    mean, half = ablations.t_interval([1.0, 1.1, 0.9])  # sd 0.1: half-width 0.248414
    assert half == pytest.approx(0.248414, abs=1e-6) and ablations.excludes_zero(mean - half, mean + half)
    assert ablations.excludes_zero(-0.3, -0.1) and not ablations.excludes_zero(-0.1, 0.0)
    assert not ablations.excludes_zero(float("nan"), float("nan"))


def test_bootstrap_of_a_constant_paired_difference_is_that_difference():
    reference = [([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1]), ([2.0, 2.0, 2.0, 2.0], [1, 1, 1, 1])]
    variant = [([v + 0.1 for v in r[0]], r[1]) for r in reference]
    estimate, low, high = ablations.bootstrap_interval(variant, reference, resamples=500)
    assert estimate == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_bootstrap_of_two_rows_spans_their_values():
    # rows of value 0 and 1 (one token each): the resampled mean is 0 (p 1/4), 0.5 (1/2) or 1 (1/4),
    # so the 95% percentile interval is [0, 1] around the estimate 0.5
    estimate, low, high = ablations.bootstrap_interval([([0.0, 1.0], [1, 1])], resamples=4000, seed=1)
    assert (estimate, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_weights_rows_by_their_tokens():
    # one run: NLL sums 3 over 3 tokens and 1 over 1 token: the token mean is 4 / 4 = 1, not (1 + 1) / 2
    estimate, low, high = ablations.bootstrap_interval([([3.0, 1.0], [3, 1])], resamples=200)
    assert estimate == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)


def _row(seed, loss, accuracy, rows=None, **extra):
    return {"recipe": "x", "seed": seed, "loss": {"all": loss, "d": loss}, "accuracy": {"all": accuracy, "d": accuracy},
            "purity": None, "nmi": None, "trainable": 10, "rows": rows, **extra}


def test_difference_cell_marks_significant_differences():
    reference = {s: _row(s, 1.0, 0.5) for s in range(3)}
    better = {s: _row(s, 1.0 - d, 0.5) for s, d in enumerate([0.10, 0.11, 0.09])}
    assert ablations.difference_cell(better, reference, "loss", "+.4f") == "-0.1000 ± 0.0248*"
    noisy = {s: _row(s, 1.0 + d, 0.5) for s, d in enumerate([0.5, 0.5, 1.0])}
    assert ablations.difference_cell(noisy, reference, "loss", "+.4f") == "+0.6667 ± 0.7171"


def test_difference_cell_bootstraps_over_rows_with_few_seeds():
    rows_ref = {"nll": [1.0, 1.0, 1.0, 1.0], "tokens": [1, 1, 1, 1], "correct": [0, 1, 0, 1]}
    rows_var = {"nll": [0.5, 0.5, 0.5, 0.5], "tokens": [1, 1, 1, 1], "correct": [1, 1, 1, 1]}
    reference = {0: _row(0, 1.0, 0.5, rows_ref)}
    variant = {0: _row(0, 0.5, 1.0, rows_var)}
    assert ablations.difference_cell(variant, reference, "loss", "+.4f") == "-0.5000 [-0.5000, -0.5000] b*"
    # accuracy: per-row differences 1, 0, 1, 0; a resample of 4 rows has k ~ Binomial(4, 1/2) ones, and
    # P(k = 0) = P(k = 4) = 1/16 > 2.5%: the interval is [0, 100] points, which does not exclude 0
    cell = ablations.difference_cell(variant, reference, "accuracy", "+.1f", 100)
    assert cell == "+50.0 [+0.0, +100.0] b"


def test_table_leaves_out_validation_rows_and_shows_the_chosen_multiplier():
    results = [dict(_row(s, 1.0, 0.5), recipe="sparse", lr_scale=3.0) for s in range(3)]
    results += [dict(_row(0, 0.2, 0.9), recipe="sparse@lr1", split="validation", lr_scale=1.0)]
    text = ablations.table(results)
    assert "sparse@lr1" not in text and "| sparse | 0,1,2 | 3 |" in text
    assert ablations.choose_lr(results + [dict(_row(0, 0.1, 0.9), recipe="sparse@lr0.3", split="validation",
                                                lr_scale=0.3)], "sparse") == 0.3
    assert ablations.choose_lr(results, "other") is None


def test_sweep_grids_per_recipe_and_the_features_inherit_the_reference_rate():
    assert ablations.sweep_scales("0.3,1,3") == {None: [0.3, 1.0, 3.0]}
    assert ablations.sweep_scales("sparse:10, lora_delta:0.1,lora_delta:0.03") == {
        "sparse": [10.0], "lora_delta": [0.1, 0.03]}
    choice = {"sparse": 3.0, "peft_lora": 1.0}
    assert ablations.lr_scale_of("recipes/x/peft_lora.toml", choice) == 1.0
    assert ablations.lr_scale_of("recipes/x/spiel.toml", choice) == 3.0  # no sweep of its own
    assert ablations.lr_scale_of("recipes/x/spiel.toml", {}) == 1.0
