"""The `curriculum` sampler (`srde_plugins.data`): easy first, competence schedules, pure in the step."""

from __future__ import annotations

import math
import types

import pytest
import torch
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


def test_a_scored_sampler_is_a_pure_function_of_seed_phase_and_step():
    s = sampler(difficulty="base_loss")
    s.scores = tuple(float((i * 37) % 101) for i in range(300))  # what prepare computes in a run
    dataset = Dataset.from_dict({"x": list(range(300))})
    again = sampler(difficulty="base_loss")
    again.scores = s.scores
    assert s.indices(dataset, PHASE, 5, 8, seed=1) == again.indices(dataset, PHASE, 5, 8, seed=1)
    easiest = set(sorted(range(300), key=lambda i: s.scores[i])[:30])  # the initial competence, 0.1
    assert set(s.indices(dataset, PHASE, 0, 16, seed=1)) <= easiest


BASE_LOSS = ['phases.rl.trainer="joint"', "phases.rl.batch_size=8", "phases.rl.steps=6", "phases.rl.checkpoint_every=3",
             'phases.rl.sampler={ name = "curriculum", strategy = "linear", warmup_epochs = 0.5 }']


@pytest.fixture
def counted(monkeypatch):
    """How many times the base model's per-example losses were computed (not read from the cache)."""
    from srde_plugins.data import scores

    calls = []
    real = scores._compute

    def compute(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(scores, "_compute", compute)
    return calls


def test_without_a_difficulty_column_the_base_models_losses_order_the_examples(tmp_path, plugins, counted,
                                                                              monkeypatch):
    from conftest import RECIPES, run_recipe_in
    from srde_core.evaluate import evaluation_state
    from srde_core.train.driver import Batches
    from srde_plugins.data.curriculum import mean_token_loss

    run = run_recipe_in(tmp_path, RECIPES / "rl_micro.toml", plugins, BASE_LOSS)  # yes/no data: no difficulty
    assert len(counted) == 1
    (cached,) = (tmp_path / ".cache" / "srde" / "scores").glob("curriculum-base-loss-*.npy")
    monkeypatch.chdir(tmp_path)  # the recipe's cache_dir is relative to the working directory
    batches = Batches(run, run.recipe.phases[1])  # prepared again: read back, not computed
    assert len(counted) == 1
    scores = batches.sampler.scores
    assert len(scores) == len(run.data.train) and len(set(scores)) > 10
    from srde_core.data.collate import collate

    rows = run.data.train.select(range(16))
    batch = collate(rows, run.tokenizer.pad_id, run.recipe.data.loss_on, run.data.domains)
    with evaluation_state(run.model, run.experts, enabled=False):  # the base: the trained experts off
        direct = mean_token_loss(run.model, batch)
    assert torch.allclose(direct, torch.tensor(scores[:16], dtype=torch.float64), rtol=1e-4)
    order = sorted(range(len(scores)), key=scores.__getitem__)
    eligible = math.ceil(0.1 * len(scores))
    assert set(batches.indices(0)) <= set(order[:eligible])  # the first batch: the easiest tenth
    cached.unlink()  # computed again now that the experts are trained: the same numbers (experts off)
    again = Batches(run, run.recipe.phases[1]).sampler.scores
    assert len(counted) == 2 and torch.allclose(torch.tensor(again), torch.tensor(scores), rtol=1e-5)


def test_a_resumed_base_loss_curriculum_reads_its_cache_and_ends_exactly_where_an_uninterrupted_run_does(
        tmp_path, plugins, counted):
    import shutil

    from safetensors.torch import load_file

    from conftest import RECIPES, run_recipe_in

    run_recipe_in(tmp_path, RECIPES / "rl_micro.toml", plugins, BASE_LOSS)
    run_dir = tmp_path / "runs" / "rl"
    (cached,) = (tmp_path / ".cache" / "srde" / "scores").glob("*.npy")
    written = cached.stat().st_mtime_ns
    full = load_file(run_dir / "adapter.safetensors")
    shutil.rmtree(run_dir / "checkpoints" / "rl-step0000006")
    (run_dir / "adapter.safetensors").unlink()
    run_recipe_in(tmp_path, RECIPES / "rl_micro.toml", plugins, BASE_LOSS, resume=True)
    resumed = load_file(run_dir / "adapter.safetensors")
    assert len(counted) == 1 and cached.stat().st_mtime_ns == written  # the second run read the cache
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
