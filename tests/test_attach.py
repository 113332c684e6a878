"""Attaching SRDE layers to each supported architecture."""

from __future__ import annotations

import json

import pytest
import torch
from srde_testkit import (
    ARCHITECTURES,
    EveryLayerLayout,
    MaskedDenseDelta,
    PlannedLayout,
    RandomSelector,
    input_ids,
    logits,
    perturb,
    tiny_config,
    tiny_model,
    topk_router_type,
)
from torch import nn

from srde_core.errors import SRDEError
from srde_core.model.architectures import find_decoder_stack, supported_architectures, text_dims
from srde_core.model.attach import ComponentSpec, attach_srde
from srde_core.model.components import LayerPlan
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.params import Params


def attach(model, layout=None, seed=0, **kwargs):
    kwargs.setdefault("delta_type", MaskedDenseDelta())
    kwargs.setdefault("router_type", topk_router_type())
    return attach_srde(model, layout=layout or EveryLayerLayout(), seed=seed, **kwargs)


def language_mlp_paths(architecture: str, layers) -> set[str]:
    prefix = "model.language_model.layers" if architecture.startswith("Mistral3") else "model.layers"
    return {f"{prefix}.{i}.mlp" for i in layers}


def test_supported_architectures_are_the_five_targets():
    assert set(supported_architectures()) == set(ARCHITECTURES)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_attach_freezes_base_and_wraps_only_language_mlps(architecture):
    model = tiny_model(architecture)
    base_params = {id(p) for p in model.parameters()}
    vision_before = {
        n: p.clone() for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n
    }

    srde = attach(model)

    wrapped = {name for name, m in model.named_modules() if isinstance(m, SRDEMLP)}
    assert wrapped == language_mlp_paths(architecture, range(3))
    assert sorted(srde.layers) == [0, 1, 2]
    for p in model.parameters():
        if id(p) in base_params:
            assert not p.requires_grad
    trainable = srde.trainable_parameters()
    assert {id(p) for p in trainable.values()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert not base_params & {id(p) for p in trainable.values()}
    # 3 routers + 3 layers x 3 projections of deltas; the positions buffers are not trainable.
    assert len(trainable) == 3 + 9
    assert all(name.startswith(("routers.", "banks.")) for name in trainable)
    if architecture == "Mistral3ForConditionalGeneration":
        assert vision_before, "the tiny Mistral3 model must have a vision tower"
        for name, p in model.named_parameters():
            if name in vision_before:
                assert torch.equal(p, vision_before[name]) and not p.requires_grad
        assert not any(isinstance(m, SRDEMLP) for m in model.model.vision_tower.modules())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_zero_deltas_equal_base_and_disabled_is_exactly_base(architecture):
    model = tiny_model(architecture)
    ids = input_ids()
    base = logits(model, ids)

    srde = attach(model)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=1e-6)

    perturb(srde)
    changed = logits(model, ids)
    assert (changed - base).abs().max() > 1e-3

    srde.set_enabled(False)
    assert not srde.enabled
    assert torch.equal(logits(model, ids), base)

    srde.set_enabled(True)
    assert torch.equal(logits(model, ids), changed)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_backward_reaches_only_srde_parameters(architecture):
    model = tiny_model(architecture)
    srde = attach(model)
    perturb(srde, scale=0.05)
    ids = input_ids()
    with srde.forward_context() as context:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()

    for name, p in srde.trainable_parameters().items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert sorted(context.routings) == sorted(srde.layers)
    assert all(r.experts.shape == (ids.numel(), 2) for r in context.routings.values())


def test_layout_selects_layers_and_leaves_others_untouched():
    model = tiny_model("LlamaForCausalLM")
    original = model.model.layers[1].mlp
    srde = attach(model, EveryLayerLayout(num_experts=3, top_k=1, layers=[2, 0]))

    assert sorted(srde.layers) == [0, 2]
    assert [p.layer for p in srde.plans] == [0, 2]
    assert model.model.layers[1].mlp is original
    assert isinstance(model.model.layers[0].mlp, SRDEMLP)
    assert srde.routers()[2].num_experts == 3 and srde.routers()[2].top_k == 1


def test_shared_bank_keys_share_modules_and_keep_own_routers():
    model = tiny_model("Ministral3ForCausalLM")
    srde = attach(model, EveryLayerLayout(shared={"shared": [0, 2]}))
    layers = srde.layers

    for proj in PROJECTIONS:
        assert layers[0].banks[proj] is layers[2].banks[proj]
        assert layers[1].banks[proj] is not layers[0].banks[proj]
    assert layers[0].router is not layers[2].router
    assert set(srde.banks()) == {"shared", "layer1"}
    state = srde.adapter_state()
    assert {k.split(".")[1] for k in state if k.startswith("banks.")} == {"shared", "layer1"}
    # 3 routers + 2 banks x 3 projections
    assert len(srde.trainable_parameters()) == 3 + 6


def test_sharing_a_bank_across_different_shapes_is_an_error():
    model = tiny_model("LlamaForCausalLM")
    wider = tiny_model("LlamaForCausalLM", intermediate_size=40).model.layers[2].mlp
    model.model.layers[2].mlp = wider
    with pytest.raises(SRDEError, match=r"layer 2 gate_proj: weight \(40, 32\) cannot share bank 'all'"):
        attach(model, EveryLayerLayout(shared={"all": [0, 1, 2]}))


def test_sharing_a_bank_with_different_expert_counts_is_an_error():
    plans = [LayerPlan(0, 4, 2, "s"), LayerPlan(1, 8, 2, "s")]
    with pytest.raises(SRDEError, match="layer 1: shares bank 's' \\(4 experts\\) but plans 8"):
        attach(tiny_model("LlamaForCausalLM"), PlannedLayout(plans))


@pytest.mark.parametrize(
    ("plans", "message"),
    [
        ([LayerPlan(3, 4, 2, "a")], "layer 3 is out of range"),
        ([LayerPlan(0, 4, 2, "a"), LayerPlan(0, 4, 2, "b")], "layer 0 is planned twice"),
        ([LayerPlan(0, 2, 3, "a")], "need 1 <= top_k <= num_experts"),
        ([LayerPlan(0, 4, 2, "a.b")], "bank key 'a.b'"),
        ([], "no layer"),
    ],
)
def test_bad_plans_are_errors_and_leave_the_model_unchanged(plans, message):
    model = tiny_model("Qwen2ForCausalLM")
    with pytest.raises(SRDEError, match=message) as info:
        attach(model, PlannedLayout(plans))
    assert info.value.key == "layout"
    assert not any(isinstance(m, SRDEMLP) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_architecture_names_class_and_supported_ones():
    class TinyNet(nn.Module):
        pass

    with pytest.raises(SRDEError) as info:
        attach(TinyNet())
    assert info.value.key == "model.architecture"
    assert "unsupported architecture 'TinyNet'" in str(info.value)
    for name in ARCHITECTURES:
        assert name in str(info.value)


def test_attaching_twice_is_an_error():
    model = tiny_model("MistralForCausalLM")
    attach(model)
    with pytest.raises(SRDEError, match="already has SRDE layers"):
        attach(model)


def test_bad_projections_are_an_error():
    with pytest.raises(SRDEError, match="projections must be distinct names"):
        attach(tiny_model("LlamaForCausalLM"), projections=["gate_proj", "o_proj"])


def test_projection_subset_gets_banks_only_there():
    srde = attach(tiny_model("LlamaForCausalLM"), projections=["down_proj", "up_proj"])
    assert srde.projections == ("up_proj", "down_proj")
    assert all(set(mlp.banks) == {"up_proj", "down_proj"} for mlp in srde.layers.values())


def test_delta_type_places_entries_with_its_selector():
    model = tiny_model("LlamaForCausalLM")

    class FirstPositions(RandomSelector):
        def select(self, weight, num_experts, count, generator):
            return torch.arange(count).repeat(num_experts, 1)

    srde = attach(model, delta_type=MaskedDenseDelta(selector=FirstPositions()))
    bank = srde.layers[0].banks["gate_proj"]
    assert torch.equal(bank.positions[1], torch.arange(bank.positions.shape[1]))


def test_same_seed_same_state_different_seed_different_state():
    def state(seed):
        return attach(tiny_model("LlamaForCausalLM"), seed=seed).adapter_state()

    a, b, c = state(3), state(3), state(4)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["routers.0.gate.weight"], c["routers.0.gate.weight"])
    assert not torch.equal(a["banks.layer0.up_proj.positions"], c["banks.layer0.up_proj.positions"])


def test_bf16_base_gets_float32_srde_state_and_exact_disabled_path():
    model = tiny_model("Ministral3ForCausalLM").to(torch.bfloat16)
    ids = input_ids()
    base = logits(model, ids)
    srde = attach(model)
    assert all(p.dtype == torch.float32 for p in srde.trainable_parameters().values())
    assert srde.adapter_state()["banks.layer0.gate_proj.positions"].dtype == torch.long

    perturb(srde, scale=0.05)
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, base)
    srde.set_enabled(False)
    assert torch.equal(logits(model, ids), base)


class DeltaArgs(Params):
    density: float = 0.5


def test_describe_is_json_and_names_the_structure():
    srde = attach(
        tiny_model("Mistral3ForConditionalGeneration"),
        EveryLayerLayout(layers=[0, 1], shared={"s": [0, 1]}),
        projections=["gate_proj"],
        components={
            "delta": ComponentSpec.of("masked-dense", DeltaArgs(density=0.25)),
            "layout": ComponentSpec.of("every-layer", {"num_experts": 4}),
            "router": ComponentSpec.of("topk"),
        },
    )
    described = srde.describe()
    assert json.loads(json.dumps(described)) == described
    assert described["architecture"] == "Mistral3ForConditionalGeneration"
    assert (described["hidden_size"], described["num_layers"]) == (32, 3)
    assert described["projections"] == ["gate_proj"]
    assert described["layers"] == [
        {"layer": 0, "num_experts": 4, "top_k": 2, "bank": "s"},
        {"layer": 1, "num_experts": 4, "top_k": 2, "bank": "s"},
    ]
    assert described["banks"] == {
        "s": {"gate_proj": {"type": "MaskedDenseBank", "num_experts": 4, "shape": [48, 32]}}
    }
    assert described["components"] == {
        "delta": {"name": "masked-dense", "params": {"density": 0.25}},
        "layout": {"name": "every-layer", "params": {"num_experts": 4}},
        "router": {"name": "topk", "params": {}},
    }


def test_components_must_be_json():
    with pytest.raises(ValueError, match="JSON-serialisable"):
        attach(tiny_model("LlamaForCausalLM"), components={"delta": ComponentSpec("d", {"x": object()})})


def test_text_dims_and_stack_of_multimodal_config():
    assert text_dims(tiny_config("Mistral3ForConditionalGeneration")) == (32, 3)
    assert text_dims(tiny_config("LlamaForCausalLM")) == (32, 3)
    stack = find_decoder_stack(tiny_model("Mistral3ForConditionalGeneration"))
    assert stack.architecture == "Mistral3ForConditionalGeneration"
    assert stack.num_layers == 3 and stack.mlp_path(1) == "model.language_model.layers.1.mlp"
