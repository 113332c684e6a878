"""Saving and loading SRDE adapters (safetensors)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from srde_testkit import EveryLayerLayout, MaskedDenseDelta, input_ids, logits, perturb, tiny_model, topk_router_type

from srde_core.errors import SRDEError
from srde_core.model import adapters
from srde_core.model.adapters import FORMAT_VERSION, load_adapter, read_adapter_metadata, save_adapter
from srde_core.model.attach import ComponentSpec, attach_srde

BASE = "tiny/ministral3"
ADAPTER_KEY = re.compile(
    r"^(routers\.\d+\.gate\.weight|banks\.[^.]+\.(gate|up|down)_proj\.(delta|positions))$"
)


def make(layout=None, seed=0, density=0.5, architecture="Ministral3ForCausalLM"):
    return attach_srde(
        tiny_model(architecture),
        layout=layout or EveryLayerLayout(shared={"shared": [0, 2]}),
        delta_type=MaskedDenseDelta(density),
        router_type=topk_router_type(),
        seed=seed,
        components={"delta": ComponentSpec.of("masked-dense", {"density": density})},
    )


def rewrite_metadata(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**metadata, **changes})


def test_round_trip_restores_parameters_buffers_and_logits(tmp_path):
    trained = make(seed=0)
    perturb(trained)
    ids = input_ids()
    expected_logits = logits(trained.model, ids)
    expected_state = {k: v.clone() for k, v in trained.adapter_state().items()}
    path = save_adapter(tmp_path / "adapter.safetensors", trained, base_model_id=BASE, recipe_hash="abc")

    # Another seed: different routers and positions, which the load must overwrite.
    fresh = make(seed=7)
    positions = "banks.shared.gate_proj.positions"
    assert not torch.equal(fresh.adapter_state()[positions], expected_state[positions])
    meta = load_adapter(path, fresh, base_model_id=BASE)

    state = fresh.adapter_state()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[k], expected_state[k]) for k in state)
    assert torch.equal(logits(fresh.model, ids), expected_logits)
    assert meta.recipe_hash == "abc"
    # Still the live parameters that training updates.
    assert all(p.requires_grad for p in fresh.trainable_parameters().values())


def test_load_into_same_model_after_perturbing(tmp_path):
    srde = make()
    perturb(srde, seed=1)
    ids = input_ids()
    saved_logits = logits(srde.model, ids)
    path = save_adapter(tmp_path / "a.safetensors", srde, base_model_id=BASE, recipe_hash="h")
    perturb(srde, seed=2)
    assert not torch.equal(logits(srde.model, ids), saved_logits)
    load_adapter(path, srde, base_model_id=BASE)
    assert torch.equal(logits(srde.model, ids), saved_logits)


def test_file_is_safetensors_with_only_srde_state(tmp_path):
    srde = make()
    path = save_adapter(tmp_path / "adapter.safetensors", srde, base_model_id=BASE, recipe_hash="h")

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(srde.adapter_state())
    assert all(ADAPTER_KEY.match(k) for k in keys), sorted(keys)
    # The shared bank once, layer 1's own bank, 3 routers.
    assert {k.split(".")[1] for k in keys if k.startswith("banks.")} == {"shared", "layer1"}
    assert len([k for k in keys if k.startswith("routers.")]) == 3
    base_shapes = {tuple(p.shape) for n, p in srde.model.named_parameters() if not p.requires_grad}
    tensors = load_file(str(path))
    assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in srde.adapter_state().values())
    assert not any(tuple(t.shape) in base_shapes for k, t in tensors.items() if k.startswith("banks."))


def test_metadata_names_format_base_structure_and_recipe(tmp_path):
    srde = make()
    path = save_adapter(tmp_path / "adapter.safetensors", srde, base_model_id=BASE, recipe_hash="r123")
    meta = read_adapter_metadata(path)
    assert meta.format_version == FORMAT_VERSION == 1
    assert meta.base_model == BASE
    assert meta.recipe_hash == "r123"
    assert meta.structure == srde.describe()
    assert meta.structure["components"]["delta"] == {"name": "masked-dense", "params": {"density": 0.5}}
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert raw["format"] == "srde-adapter" and json.loads(raw["structure"]) == srde.describe()


def test_other_base_model_is_a_one_line_error(tmp_path):
    path = save_adapter(tmp_path / "adapter.safetensors", make(), base_model_id=BASE, recipe_hash="h")
    with pytest.raises(SRDEError) as info:
        load_adapter(path, make(), base_model_id="mistralai/Other")
    assert str(info.value) == f"{path}: built for base '{BASE}', this model is 'mistralai/Other'"


def test_other_layout_is_an_error_and_loads_nothing(tmp_path):
    path = save_adapter(tmp_path / "adapter.safetensors", make(), base_model_id=BASE, recipe_hash="h")
    other = make(layout=EveryLayerLayout(num_experts=8, shared={"shared": [0, 2]}))
    before = {k: v.clone() for k, v in other.adapter_state().items()}
    message = r"layout differs: layers\[0\]\.num_experts: the adapter has 4, this model 8"
    with pytest.raises(SRDEError, match=message):
        load_adapter(path, other, base_model_id=BASE)
    assert all(torch.equal(v, before[k]) for k, v in other.adapter_state().items())

    unshared = make(layout=EveryLayerLayout())
    with pytest.raises(SRDEError, match=r"layout differs: layers\[0\]\.bank"):
        load_adapter(path, unshared, base_model_id=BASE)


def test_other_delta_params_are_a_structure_error(tmp_path):
    path = save_adapter(tmp_path / "adapter.safetensors", make(), base_model_id=BASE, recipe_hash="h")
    with pytest.raises(SRDEError, match=r"structure differs: components\.delta\.params\.density"):
        load_adapter(path, make(density=0.25), base_model_id=BASE)


def test_other_architecture_is_a_structure_error(tmp_path):
    path = save_adapter(tmp_path / "adapter.safetensors", make(), base_model_id=BASE, recipe_hash="h")
    message = 'structure differs: architecture: the adapter has "Ministral3ForCausalLM"'
    with pytest.raises(SRDEError, match=message):
        load_adapter(path, make(architecture="LlamaForCausalLM"), base_model_id=BASE)


def test_newer_format_is_refused_and_older_loads_with_a_warning(tmp_path):
    srde = make()
    path = save_adapter(tmp_path / "adapter.safetensors", srde, base_model_id=BASE, recipe_hash="h")
    rewrite_metadata(path, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(SRDEError, match=f"format version {FORMAT_VERSION + 1} is newer"):
        load_adapter(path, srde, base_model_id=BASE)

    rewrite_metadata(path, format_version="0")
    with pytest.warns(UserWarning, match="format version 0 is older"):
        meta = load_adapter(path, srde, base_model_id=BASE)
    assert meta.format_version == 0


def test_missing_tensor_is_an_error(tmp_path):
    srde = make()
    path = save_adapter(tmp_path / "adapter.safetensors", srde, base_model_id=BASE, recipe_hash="h")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    del tensors["routers.1.gate.weight"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(SRDEError, match=r"tensors differ: missing \['routers\.1\.gate\.weight'\]"):
        load_adapter(path, srde, base_model_id=BASE)


def test_not_an_adapter_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SRDEError, match="no such adapter file"):
        read_adapter_metadata(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SRDEError, match="not a safetensors file"):
        read_adapter_metadata(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(SRDEError, match="not an SRDE adapter"):
        read_adapter_metadata(plain)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    srde = make()
    path = tmp_path / "out" / "adapter.safetensors"
    save_adapter(path, srde, base_model_id=BASE, recipe_hash="first")
    perturb(srde)
    save_adapter(path, srde, base_model_id=BASE, recipe_hash="second")
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]
    assert read_adapter_metadata(path).recipe_hash == "second"

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, srde, base_model_id=BASE, recipe_hash="third")
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]
    assert read_adapter_metadata(path).recipe_hash == "second"


def test_an_adapter_from_before_a_component_argument_existed_loads_with_a_warning(tmp_path):
    trained = make(seed=0)
    path = save_adapter(tmp_path / "a.safetensors", trained, base_model_id=BASE, recipe_hash="h")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    structure = json.loads(metadata["structure"])
    del structure["components"]["delta"]["params"]["density"]  # as if written before `density` existed
    rewrite_metadata(path, structure=json.dumps(structure))
    with pytest.warns(UserWarning, match="components.delta.params.density"):
        load_adapter(path, make(seed=1), base_model_id=BASE)
    del structure["components"]["delta"]  # a whole component missing is a real difference
    rewrite_metadata(path, structure=json.dumps(structure))
    with pytest.raises(SRDEError, match="structure differs: components.delta"):
        load_adapter(path, make(seed=1), base_model_id=BASE)
