"""The Python API (`import srde`): run, load, generate, experts off, attach."""

from __future__ import annotations

import os

import pytest
import torch

import srde


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, plugins):
    from conftest import RECIPES

    workdir = tmp_path_factory.mktemp("api")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        run_dir = srde.run(RECIPES / "micro.toml", overrides=["phases.experts.steps=4"], plugins=plugins)
    finally:
        os.chdir(previous)
    return workdir / run_dir


def test_run_returns_the_run_directory(api_run):
    assert (api_run / "adapter.safetensors").is_file() and (api_run / "recipe.json").is_file()


def test_load_gives_a_model_that_generates_what_srde_generate_prints(api_run):
    model, tokenizer = srde.load(api_run)
    prompt = "Q: what is 3 + 4?\nA:"
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
    new = out[0, len(ids):].tolist()
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert tokenizer.decode(new) == srde.generate(api_run, prompt, max_new_tokens=5)


def test_experts_off_is_the_base_model_and_is_restored(api_run):
    model, _ = srde.load(api_run)
    experts = srde.experts_of(model)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with srde.experts_off(model):
            off = model(input_ids=ids).logits
            experts_on_inside = experts.enabled
        again = model(input_ids=ids).logits
    assert not experts_on_inside and experts.enabled
    assert not torch.allclose(on, off) and torch.equal(on, again)


def test_attach_takes_a_recipe_or_an_srde_table(micro_recipe):
    from srde_testkit import tiny_model

    model = tiny_model("Ministral3ForCausalLM")
    experts = srde.attach(model, {"layout": {"name": "uniform", "num_experts": 3, "top_k": 1},
                                  "delta": {"name": "lora", "rank": 2}})
    assert srde.experts_of(model) is experts
    assert {p.num_experts for p in experts.plans} == {3} and experts.describe()["components"]["delta"]["name"] == "lora"
    other = tiny_model("Ministral3ForCausalLM")
    from_recipe = srde.attach(other, micro_recipe)
    assert from_recipe.describe()["components"]["delta"]["params"]["density"] == 0.05
