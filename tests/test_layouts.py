"""The `uniform` layout: which layers get experts, how many, and which share a bank."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from srde_core.errors import RecipeError
from srde_core.model.components import LayerPlan
from srde_plugins.layouts import UniformLayoutParams
from srde_plugins.layouts.uniform import UniformLayout


def plan(num_layers: int, **params) -> list[LayerPlan]:
    return UniformLayout(UniformLayoutParams(**params)).plan(num_layers)


def test_defaults_put_eight_experts_top_two_in_every_layer():
    plans = plan(3)
    assert [p.layer for p in plans] == [0, 1, 2]
    assert {(p.num_experts, p.top_k) for p in plans} == {(8, 2)}
    assert len({p.bank for p in plans}) == 3  # a bank per layer


def test_registered_through_the_plugin_system(plugins):
    component = plugins.registries["layout"].get("uniform")
    layout = component.build(component.params(num_experts=4, top_k=1, layers=[1]))
    [only] = layout.plan(2)
    assert (only.layer, only.num_experts, only.top_k) == (1, 4, 1)


def test_explicit_and_negative_layers_in_layer_order():
    plans = plan(6, layers=[-1, 0, 2, -3])
    assert [p.layer for p in plans] == [0, 2, 3, 5]


def test_share_across_layers_gives_every_layer_one_bank_key():
    plans = plan(4, layers=[0, 3], share_across_layers=True)
    assert len({p.bank for p in plans}) == 1
    assert [p.layer for p in plans] == [0, 3]


def test_bank_keys_are_usable_module_names():
    for plans in (plan(3), plan(3, share_across_layers=True)):
        for p in plans:
            assert p.bank and "." not in p.bank


@pytest.mark.parametrize("index", [4, -5, 100])
def test_out_of_range_layer_names_the_recipe_key(index):
    with pytest.raises(RecipeError) as err:
        plan(4, layers=[0, index])
    assert err.value.key == "srde.layout.layers"
    assert str(index) in str(err.value) and "4 layers" in str(err.value)


def test_a_layer_named_twice_is_an_error():
    with pytest.raises(RecipeError, match="already listed") as err:
        plan(4, layers=[1, -3])
    assert err.value.key == "srde.layout.layers"


@pytest.mark.parametrize(
    "params",
    [
        {"top_k": 3, "num_experts": 2},
        {"num_experts": 0},
        {"top_k": 0},
        {"layers": []},
        {"layers": "some"},
        {"layers": [1.5]},
        {"num_experts": "8"},  # strict: TOML gives real types
        {"share_across_layers": "yes"},
        {"experts": 8},  # unknown key
    ],
)
def test_invalid_params_are_rejected(params):
    with pytest.raises(ValidationError):
        UniformLayoutParams(**params)


def test_top_k_may_equal_num_experts():
    assert plan(1, num_experts=3, top_k=3)[0].top_k == 3
