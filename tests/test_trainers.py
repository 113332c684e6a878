"""The built-in trainers: base pre-training and its cache key, joint training on frozen weights."""

from __future__ import annotations

import types

import pytest

from srde_core.errors import RecipeError
from srde_core.recipe import load_recipe
from srde_core.run import BaseInfo
from srde_plugins.trainers import BasePretrainParams
from srde_plugins.trainers.base_pretrain import BasePretrain
from srde_plugins.trainers.base_pretrain import base_key as _base_key


def fake_run(recipe, experts=None):
    return types.SimpleNamespace(
        recipe=recipe,
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
