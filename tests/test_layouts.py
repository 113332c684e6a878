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


# ---- cross-layer sharing options and the `depth` layout -----------------------------------------

from srde_plugins.layouts import DepthLayoutParams, DepthStage  # noqa: E402
from srde_plugins.layouts.depth import DepthLayout  # noqa: E402


def depth_plan(num_layers: int, **params) -> list[LayerPlan]:
    return DepthLayout(DepthLayoutParams(**params)).plan(num_layers)


def test_share_every_groups_adjacent_chosen_layers():
    plans = plan(6, share_every=2)
    assert [p.bank for p in plans] == ["group0", "group0", "group1", "group1", "group2", "group2"]
    plans = plan(5, layers=[0, 2, 4], share_every=2)
    assert [(p.layer, p.bank) for p in plans] == [(0, "group0"), (2, "group0"), (4, "group1")]


def test_share_groups_are_explicit_and_checked():
    plans = plan(4, share_groups=[[0, -1], [1, 2]])
    assert [(p.layer, p.bank) for p in plans] == [(0, "group0"), (1, "group1"), (2, "group1"), (3, "group0")]
    with pytest.raises(RecipeError, match="names layer 1 twice"):
        plan(4, share_groups=[[0, 1], [1]])
    with pytest.raises(RecipeError, match="gets no experts"):
        plan(4, layers=[0, 1], share_groups=[[0, 3]])
    with pytest.raises(ValidationError, match="one of"):
        UniformLayoutParams(share_every=2, share_across_layers=True)


def test_depth_default_is_4_8_4_on_quarter_half_quarter_of_40_layers():
    plans = depth_plan(40)
    by_experts = {n: [p.layer for p in plans if p.num_experts == n] for n in (4, 8)}
    assert by_experts[4] == [*range(10), *range(30, 40)] and by_experts[8] == list(range(10, 30))
    assert {p.top_k for p in plans if p.num_experts == 8} == {2} and {p.top_k for p in plans if p.num_experts == 4} == {1}


def test_depth_fractions_fit_the_tiny_model_too():
    assert [(p.layer, p.num_experts, p.top_k) for p in depth_plan(4)] == [(0, 4, 1), (1, 8, 2), (2, 8, 2), (3, 4, 1)]


def test_depth_stage_without_experts_skips_its_layers():
    stages = [DepthStage(until=0.5, num_experts=0), DepthStage(until=1.0, num_experts=2, top_k=1)]
    assert [p.layer for p in depth_plan(6, stages=stages)] == [3, 4, 5]


def test_depth_stages_must_end_at_one_and_increase():
    with pytest.raises(ValidationError, match="ending at 1.0"):
        DepthLayoutParams(stages=[DepthStage(until=0.5, num_experts=2)])
    with pytest.raises(ValidationError, match="strictly increasing"):
        DepthLayoutParams(stages=[DepthStage(until=0.7, num_experts=2), DepthStage(until=0.5, num_experts=2), DepthStage(until=1.0, num_experts=2)])


def test_depth_with_sharing_composes_and_attaches_with_shared_banks_saved_once(tmp_path):
    from srde_testkit import MaskedDenseDelta, perturb, tiny_model, topk_router_type

    from srde_core.errors import SRDEError
    from srde_core.model.adapters import load_adapter, save_adapter
    from srde_core.model.attach import attach_srde

    stages = [DepthStage(until=0.34, num_experts=2, top_k=1), DepthStage(until=1.0, num_experts=4, top_k=2)]
    layout = DepthLayout(DepthLayoutParams(stages=stages, share_groups=[[1, 2]]))

    def attach(seed):
        return attach_srde(tiny_model("LlamaForCausalLM"), layout=layout, delta_type=MaskedDenseDelta(),
                           router_type=topk_router_type(), seed=seed)

    srde = attach(0)
    assert [(p.layer, p.num_experts, p.bank) for p in srde.plans] == [(0, 2, "layer0"), (1, 4, "group0"), (2, 4, "group0")]
    assert srde.layers[1].banks["up_proj"] is srde.layers[2].banks["up_proj"]
    assert srde.layers[1].router is not srde.layers[2].router
    perturb(srde)
    path = save_adapter(tmp_path / "a.safetensors", srde, base_model_id="b", recipe_hash="h")
    keys = set(srde.adapter_state())
    assert sum(k.startswith("banks.group0.") for k in keys) == 3 * 2  # 3 projections x (delta, positions), once
    other = attach(5)
    load_adapter(path, other, base_model_id="b")
    assert all(bool((other.adapter_state()[k] == v).all()) for k, v in srde.adapter_state().items())

    mismatched = DepthLayout(DepthLayoutParams(stages=stages, share_groups=[[0, 1]]))
    with pytest.raises(SRDEError, match="shares bank 'group0'"):
        attach_srde(tiny_model("LlamaForCausalLM"), layout=mismatched, delta_type=MaskedDenseDelta(),
                    router_type=topk_router_type(), seed=0)
