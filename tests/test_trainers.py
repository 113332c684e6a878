"""The built-in trainers: base pre-training and its cache key, joint training on frozen weights."""

from __future__ import annotations

import types

import pytest
import torch

from srde_core.errors import RecipeError
from srde_core.recipe import load_recipe
from srde_core.run import BaseInfo
from srde_core.train.trainer import PhaseResult, Trainer
from srde_plugins.trainers import BasePretrainParams
from srde_plugins.trainers.base_pretrain import BasePretrain
from srde_plugins.trainers.base_pretrain import base_key as _base_key


def fake_run(recipe, experts=None, processes=1):
    from srde_core.dist import Dist

    return types.SimpleNamespace(
        recipe=recipe,
        device=torch.device("cpu"),
        dist=Dist(world_size=processes),
        tokenizer=types.SimpleNamespace(fingerprint="tok"),
        data=types.SimpleNamespace(fingerprint="data"),
        experts=experts,
        base=BaseInfo("x"),
    )


def test_base_cache_key_changes_with_anything_that_changes_the_weights(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins)
    key = _base_key(fake_run(recipe), recipe.phases[0])
    assert key == _base_key(fake_run(recipe), recipe.phases[0])
    for override in ("seed=1", "phases.base.lr=0.01", "model.config.hidden_size=32", "phases.base.steps=7",
                     "data.loss_on=answer"):
        other = load_recipe(micro_recipe, plugins, [override])
        assert _base_key(fake_run(other), other.phases[0]) != key, override
    run = fake_run(recipe)
    run.data.fingerprint = "other data"
    assert _base_key(run, recipe.phases[0]) != key
    assert _base_key(fake_run(recipe, processes=2), recipe.phases[0]) != key  # another global batch
    for cosmetic in ("phases.base.log_every=3", "phases.base.checkpoint_every=5", "phases.base.keep_checkpoints=4"):
        other = load_recipe(micro_recipe, plugins, [cosmetic])
        assert _base_key(fake_run(other), other.phases[0]) == key, cosmetic


def test_base_key_ignores_the_expert_phases(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins)
    other = load_recipe(micro_recipe, plugins, ["phases.experts.lr=0.5", "srde.delta.density=0.1"])
    assert _base_key(fake_run(recipe), recipe.phases[0]) == _base_key(fake_run(other), other.phases[0])


def test_base_pretrain_after_experts_are_attached_is_refused(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins)
    with pytest.raises(RecipeError, match="base_pretrain must come before"):
        BasePretrain(BasePretrainParams()).run(fake_run(recipe, experts=object()), recipe.phases[0])


def test_trainers_are_registered_with_their_params(plugins):
    registry = plugins.registries["trainer"]
    assert {"base_pretrain", "joint"} <= set(registry.names())
    assert registry.get("base_pretrain").params is BasePretrainParams


def test_base_seed_shares_one_base_across_run_seeds(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins, ["base_seed=0"])
    key = _base_key(fake_run(recipe), recipe.phases[0])
    other_seed = load_recipe(micro_recipe, plugins, ["base_seed=0", "seed=5"])
    assert _base_key(fake_run(other_seed), other_seed.phases[0]) == key
    other_base = load_recipe(micro_recipe, plugins, ["base_seed=3"])
    assert _base_key(fake_run(other_base), other_base.phases[0]) != key


def test_runs_of_other_seeds_train_their_experts_on_the_one_cached_base(tmp_path, plugins, micro_recipe):
    from safetensors.torch import load_file

    from conftest import run_recipe_in

    first = run_recipe_in(tmp_path, micro_recipe, plugins, ["base_seed=0", "seed=0", "name=s0"])
    second = run_recipe_in(tmp_path, micro_recipe, plugins, ["base_seed=0", "seed=1", "name=s1"])
    assert first.base.weights == second.base.weights  # the second run loaded the first one's base
    a = load_file(tmp_path / "runs" / "s0" / "adapter.safetensors")
    b = load_file(tmp_path / "runs" / "s1" / "adapter.safetensors")
    values = [k for k in a if k.endswith("values")]
    assert values and any(not (a[k] == b[k]).all() for k in values)  # the seeds still differ


def test_base_pretrain_returns_the_base_it_loaded_and_leaves_the_runs_base_alone(tmp_path, plugins, micro_recipe):
    """The trainer contract: a trainer returns the base it trained (``PhaseResult.base``); the core
    sets ``run.base`` (here frozen: a write would fail)."""
    from dataclasses import FrozenInstanceError, dataclass

    from safetensors.torch import save_file

    @dataclass(frozen=True)
    class FrozenBase:
        id: str
        weights: str | None = None

    recipe = load_recipe(micro_recipe, plugins, [f'cache_dir="{(tmp_path / "cache").as_posix()}"'])
    run = fake_run(recipe)
    run.base, run.model, run.log = FrozenBase("default"), torch.nn.Linear(3, 2), lambda message: None
    key = _base_key(run, recipe.phases[0])
    cached = tmp_path / "cache" / "base" / key / "model.safetensors"
    cached.parent.mkdir(parents=True)
    saved = {name: torch.randn_like(t) for name, t in run.model.state_dict().items()}
    save_file(saved, cached)
    result = BasePretrain(BasePretrainParams()).run(run, recipe.phases[0])
    assert isinstance(result, PhaseResult) and run.base == FrozenBase("default")
    assert result.base.id == f"{recipe.model.architecture}:pretrained-{key}"
    assert result.base.weights == str(cached.resolve())
    assert torch.equal(run.model.weight, saved["weight"])  # the cached base was loaded
    with pytest.raises(FrozenInstanceError):  # what the old trainer did
        run.base.id = "x"


class Rebase(Trainer):
    """Replaces the run's base: returns it (``PhaseResult.base``)."""

    def __init__(self, params):
        pass

    def run(self, run, phase):
        return PhaseResult({"rebased": 1.0}, BaseInfo(f"{run.base.id}+rebased", None))


class Nothing(Trainer):
    """Returns nothing: the base stays as it is."""

    def __init__(self, params):
        pass

    def run(self, run, phase):
        return None


def _trainer_kit():
    from srde_core.hookspecs import hookimpl
    from srde_core.plugins import load_plugins

    @hookimpl
    def srde_register(registry):
        registry.add("trainer", "rebase", Rebase, summary="Replaces the run's base id.")
        registry.add("trainer", "nothing", Nothing, summary="Does nothing.")

    kit = load_plugins(extra=[("trainer-kit", types.SimpleNamespace(srde_register=srde_register))])
    assert not kit.broken, kit.broken_note()
    return kit


@pytest.mark.parametrize("trainer", ["rebase", "nothing"])
def test_the_run_takes_the_base_a_trainer_returns_and_keeps_it_when_none(tmp_path, micro_recipe, trainer):
    import json

    from conftest import run_recipe_in

    from srde_core.run import default_base_id

    kit = _trainer_kit()
    run = run_recipe_in(tmp_path, micro_recipe, kit, [f'phases.base.trainer="{trainer}"', "phases.experts.steps=1"])
    default = default_base_id(run.recipe)
    expected = f"{default}+rebased" if trainer == "rebase" else default
    assert run.base.id == expected
    recorded = json.loads((tmp_path / "runs" / "micro" / "base.json").read_text())
    assert recorded["id"] == expected and recorded["weights"] is None
