"""gate_proj and up_proj share the gathered input through the layer's BankCall cache: exact, and
released after the forward."""

from __future__ import annotations

import torch
from srde_testkit import make_router

from srde_plugins.deltas.sparse.kernels import build_csr_structure, routed_sparse_delta


def setup(seed=0, tokens=40, d_in=12, d_out=20, experts=4, count=30):
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(d_in * d_out, generator=g)[:count].sort().values for _ in range(experts)])
    structure = build_csr_structure(positions, d_out, d_in)
    x = torch.randn(tokens, d_in, generator=g, requires_grad=True)
    router = make_router(d_in, experts, 2)
    groups = router(x.detach()).groups()
    values = torch.randn(experts, count, generator=g, requires_grad=True)
    return x, values, structure, groups


def test_a_second_projection_reuses_the_gathered_input_and_stays_exact():
    x, values, structure, groups = setup()
    other = (values.detach() * 2).requires_grad_(True)
    routing = (structure, groups.tokens, groups.weights.detach(), groups.offsets)
    shared: dict = {}
    first = routed_sparse_delta(x, values, *routing, shared=shared)
    assert len(shared) == 1
    second = routed_sparse_delta(x, other, *routing, shared=shared)
    assert len(shared) == 1, "the second projection gathered again"
    (first.sum() + (second * 3).sum()).backward()
    grads = (x.grad.clone(), values.grad.clone(), other.grad.clone())

    x.grad = values.grad = other.grad = None
    alone_1 = routed_sparse_delta(x, values, *routing)
    alone_2 = routed_sparse_delta(x, other, *routing)
    (alone_1.sum() + (alone_2 * 3).sum()).backward()
    assert torch.equal(first, alone_1) and torch.equal(second, alone_2)
    for shared_grad, plain_grad in zip(grads, (x.grad, values.grad, other.grad)):
        assert torch.equal(shared_grad, plain_grad)


def test_gate_and_up_share_one_cache_and_down_gets_its_own(plugins, micro_recipe):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    from srde_core.model.build import attach_recipe_experts
    from srde_core.recipe import load_recipe

    recipe = load_recipe(micro_recipe, plugins)
    model = Ministral3ForCausalLM(Ministral3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64,
    ))
    experts = attach_recipe_experts(model, recipe)
    seen = []
    for layer in experts.layers.values():
        for name, bank in layer.banks.items():
            bank.register_forward_hook(lambda module, args, out, name=name: seen.append((name, args[1].cache, len(args[1].cache))))
    model(input_ids=torch.randint(0, 64, (2, 6)))
    by_layer = [seen[i:i + 3] for i in range(0, len(seen), 3)]
    assert len(by_layer) == 2
    for (g, g_cache, g_len), (u, u_cache, u_len), (d, d_cache, d_len) in by_layer:
        assert (g, u, d) == ("gate_proj", "up_proj", "down_proj")
        assert g_cache is u_cache and d_cache is not g_cache
        assert g_len == u_len == d_len == 1  # one gathered input per cache: up_proj reused gate_proj's
