"""One forward context, built by the core for training, eval and generation alike."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import hash_router_plugin
from conftest import run_recipe_in
from srde_core.model.context import ForwardContext
from srde_core.plugins import load_plugins

RECIPE = """
extends = "{micro}"
name = "hashed"
[srde]
router = "token_hash"
[[phases]]
name = "experts"
trainer = "joint"
steps = 2
batch_size = 8
lr = 1e-2
losses = ["lm"]
[eval]
max_examples_per_domain = 1
max_new_tokens = 3
batch_size = 8
"""


@pytest.fixture
def hash_plugins():
    hash_router_plugin.SEEN.clear()
    return load_plugins(extra=[("hash-router", hash_router_plugin)])


def test_a_token_hash_router_trains_evaluates_and_generates(tmp_path, micro_recipe, hash_plugins, monkeypatch):
    import srde_core.plugins
    from srde_core.evaluate.report import evaluate_run

    recipe = tmp_path / "hashed.toml"
    recipe.write_text(RECIPE.format(micro=micro_recipe))
    run_recipe_in(tmp_path, recipe, hash_plugins)
    assert {mode for mode, _ in hash_router_plugin.SEEN} == {"train"}
    hash_router_plugin.SEEN.clear()
    monkeypatch.setattr(srde_core.plugins, "load_plugins", lambda **_: hash_plugins)
    result = evaluate_run(tmp_path / "runs" / "hashed", Console(file=io.StringIO()))
    assert result["routing"] is not None
    modes = [mode for mode, _ in hash_router_plugin.SEEN]
    assert "eval" in modes and "generate" in modes
    generated = [shape for mode, shape in hash_router_plugin.SEEN if mode == "generate"]
    assert any(shape[1] == 1 for shape in generated)  # with the KV cache: the new token alone
    assert any(shape[1] > 1 for shape in generated)  # the prompt


def test_the_core_builds_every_context_from_the_batch():
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "domain_ids": torch.tensor([2]), "difficulty": torch.tensor([1])}
    context = ForwardContext.from_batch(batch, "eval")
    assert context.mode == "eval" and context.input_ids is batch["input_ids"]
    assert context.difficulty is batch["difficulty"] and context.domain_ids is batch["domain_ids"]
    assert context.token_ids(3).tolist() == [5, 6, 7]
    assert context.per_token(context.domain_ids, 3).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="mode"):
        ForwardContext.from_batch(batch, "predict")
