"""The `curriculum` sampler (`srde_plugins.data`): easy first, competence schedules, pure in the step."""

from __future__ import annotations

import math
import types

import pytest
from datasets import Dataset

from srde_core.errors import DataError
from srde_plugins.data import CurriculumParams
from srde_plugins.data.curriculum import CurriculumSampler

PHASE = types.SimpleNamespace(name="experts")


def data(n=300):
    return Dataset.from_dict({"difficulty": [1 + (i * 7) % 3 for i in range(n)], "x": list(range(n))})


def sampler(**params):
    return CurriculumSampler(CurriculumParams(**params))


def test_competence_schedules_match_their_formulas():
    c0, size, batch = 0.1, 1000, 10
    for step in (0, 10, 50, 99):
        t = step * batch / size
        assert sampler(strategy="linear").competence(step, batch, size) == pytest.approx(c0 + (1 - c0) * t)
        assert sampler(strategy="exponential").competence(step, batch, size) == pytest.approx(c0 * (1 / c0) ** t)
        assert sampler(strategy="competence").competence(step, batch, size) == pytest.approx(math.sqrt(t * (1 - c0**2) + c0**2))
    assert sampler(warmup_epochs=2.0).competence(200, batch, size) == 1.0


def test_early_batches_hold_only_the_easiest_examples_and_later_ones_everything():
    dataset = data()
    s = sampler(strategy="linear", initial=0.2, warmup_epochs=1.0)
    early = s.indices(dataset, PHASE, 0, 16, seed=0)
    assert {dataset[i]["difficulty"] for i in early} == {1}  # the easiest 20% are all difficulty 1
    late = sum((s.indices(dataset, PHASE, step, 16, seed=0) for step in range(40, 60)), [])
    assert {dataset[i]["difficulty"] for i in late} == {1, 2, 3}


def test_batches_are_a_pure_function_of_seed_phase_and_step():
    dataset, s = data(), sampler()
    assert s.indices(dataset, PHASE, 7, 8, seed=3) == sampler().indices(dataset, PHASE, 7, 8, seed=3)
    assert s.indices(dataset, PHASE, 7, 8, seed=3) != s.indices(dataset, PHASE, 8, 8, seed=3)


def test_data_without_difficulty_is_one_clear_error():
    with pytest.raises(DataError, match="difficulty"):
        sampler().indices(Dataset.from_dict({"x": [1, 2]}), PHASE, 0, 2, seed=0)
    with pytest.raises(DataError, match="different difficulty"):
        sampler().indices(Dataset.from_dict({"difficulty": [0, 0, 0]}), PHASE, 0, 2, seed=0)


def test_a_micro_run_trains_on_the_curriculum_batches(tmp_path, plugins, micro_recipe):
    import json

    from conftest import run_recipe_in

    overrides = ['phases.experts.sampler={ name = "curriculum", strategy = "linear", warmup_epochs = 0.5 }',
                 "phases.experts.log_every=1"]
    run = run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    lines = (tmp_path / "runs" / "micro" / "metrics.jsonl").read_text().splitlines()
    experts = [json.loads(line) for line in lines if '"experts"' in line]
    assert [m["step"] for m in experts] == list(range(1, 7))
    competence = [m["competence"] for m in experts]
    assert competence == sorted(competence) and competence[0] == 0.1
    from srde_core.train.driver import Batches

    batches = Batches(run, run.recipe.phases[1])
    assert batches.sampler.params.strategy == "linear"
    first = {run.data.train[i]["difficulty"] for i in batches.indices(0)}
    assert first == {min(run.data.train["difficulty"])}
