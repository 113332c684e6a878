"""SRDE layers under HF gradient checkpointing: same loss, same gradients, router stats intact."""

from __future__ import annotations

import types

import torch
from transformers import Ministral3Config, Ministral3ForCausalLM

from srde_core.dist import SINGLE
from srde_core.model.build import attach_recipe_experts, enable_checkpointing
from srde_core.model.context import ForwardContext
from srde_core.recipe import load_recipe
from srde_core.train.engine import BackboneForward
from srde_core.train.objective import Objective, router_statistics


def experts_model(plugins, recipe, checkpointing: bool):
    torch.manual_seed(0)
    config = Ministral3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, tie_word_embeddings=True,
    )
    model = Ministral3ForCausalLM(config)
    experts = attach_recipe_experts(model, recipe)
    with torch.no_grad():
        for name, p in experts.trainable_parameters().items():
            p.add_(0.05 * torch.randn_like(p))
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    return model, experts


def test_checkpointed_training_step_matches_the_plain_one(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins)
    run = types.SimpleNamespace(data=types.SimpleNamespace(domains=["a", "b"]), hook=plugins.hook, dist=SINGLE)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    results = []
    for checkpointing in (False, True):
        model, experts = experts_model(plugins, recipe, checkpointing)
        session = types.SimpleNamespace(forward=BackboneForward(model))
        loss, parts = Objective(run, recipe.phases[1], model, experts)(batch, 0, session)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in experts.trainable_parameters().items()}
        results.append((float(loss.detach()), parts, grads))
    (loss_a, parts_a, grads_a), (loss_b, parts_b, grads_b) = results
    assert loss_a == loss_b
    assert parts_a["router_max_load"] == parts_b["router_max_load"]
    assert parts_a["router_entropy"] == parts_b["router_entropy"]
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_router_statistics_are_bounded(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins)
    model, experts = experts_model(plugins, recipe, False)
    with experts.forward_context() as context:
        model(input_ids=torch.randint(0, 64, (2, 8)))
    stats = router_statistics(context.ordered_routings())
    num_experts = recipe.srde.layout.params.num_experts
    assert 1 / num_experts <= stats["router_max_load"] <= 1.0
    assert 0.0 <= stats["router_entropy"] <= torch.log(torch.tensor(float(num_experts))).item() + 1e-6


def test_forced_routing_survives_the_recomputation(plugins, micro_recipe):
    """Phase 1 forces each example to its domain's expert through the forward context; the
    recomputation in backward runs after that context closed and must route as the forward did
    (it used to fall back to the router: a CheckpointError on the saved-tensor count)."""
    recipe = load_recipe(micro_recipe, plugins)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    domains = torch.tensor([0, 1, 1, 0])
    results = []
    for checkpointing in (False, True):
        model, experts = experts_model(plugins, recipe, checkpointing)
        forced = {plan.layer: domains % plan.num_experts for plan in experts.plans}
        with experts.forward_context(ForwardContext(domain_ids=domains, forced_experts=forced)):
            hidden = BackboneForward(model)(input_ids=ids, attention_mask=torch.ones_like(ids))
        hidden.pow(2).mean().backward()
        results.append({n: p.grad.clone() for n, p in experts.trainable_parameters().items() if p.grad is not None})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys() and any(name.startswith("banks.") for name in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7)
