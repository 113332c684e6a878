"""gate_proj and up_proj share the gathered input through Routing.scratch: exact, and released."""

from __future__ import annotations

import torch

from srde_core.model.routing import Router
from srde_plugins.sparse_kernels import build_csr_structure, routed_sparse_delta


def setup(seed=0, tokens=40, d_in=12, d_out=20, experts=4, count=30):
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(d_in * d_out, generator=g)[:count].sort().values for _ in range(experts)])
    structure = build_csr_structure(positions, d_out, d_in)
    x = torch.randn(tokens, d_in, generator=g, requires_grad=True)
    router = Router(d_in, experts, 2, generator=g)
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


def test_the_layer_clears_the_scratch_after_its_forward(plugins, micro_recipe):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    from srde_core.model.attach import attach_srde
    from srde_core.model.build import build_experts_components
    from srde_core.recipe import load_recipe

    recipe = load_recipe(micro_recipe, plugins)
    model = Ministral3ForCausalLM(Ministral3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64,
    ))
    build = lambda choice: plugins.registries[choice.kind].get(choice.name).build(choice.params)  # noqa: E731
    layout, delta, selector, specs = build_experts_components(recipe, build)
    experts = attach_srde(model, layout=layout, delta_type=delta, selector=selector,
                          projections=recipe.srde.projections, seed=0, components=specs)
    model(input_ids=torch.randint(0, 64, (2, 6)))
    for router in experts.routers().values():
        assert router.last is not None and router.last.scratch == {}
