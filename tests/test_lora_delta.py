"""The `lora` delta (`srde_plugins.deltas.lora`): one expert is exactly plain LoRA, the grouped
computation equals a per-expert loop, gram without dense deltas, adapters round-trip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from srde_testkit import input_ids, logits, tiny_model

from srde_core.model.components import BankCall
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component

PLUGINS = load_plugins()


def bank(out=12, inp=10, experts=4, rank=3, alpha=6.0):
    delta = resolve_component(PLUGINS, "delta", {"name": "lora", "rank": rank, "alpha": alpha}).build()
    b = delta.make_bank(torch.zeros(out, inp), experts, torch.Generator().manual_seed(0))
    with torch.no_grad():
        b.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    return b


def call_for(experts, weights, num_experts):
    probs = torch.full((experts.shape[0], num_experts), 1.0 / num_experts)
    return BankCall(Routing(experts, weights, probs, probs.log(), num_experts), ForwardContext())


def test_one_expert_with_weight_one_is_plain_lora():
    b = bank(experts=1)
    x = torch.randn(7, 10)
    y = b(x, call_for(torch.zeros(7, 1, dtype=torch.long), torch.ones(7, 1), 1))
    expected = (6.0 / 3) * F.linear(F.linear(x, b.lora_A), b.lora_B)  # (alpha / r) B A x
    torch.testing.assert_close(y, expected)


def test_grouped_computation_equals_a_loop_over_tokens_and_experts():
    b = bank()
    x = torch.randn(9, 10, dtype=torch.float64)
    b = b.double()
    experts = torch.randint(0, 4, (9, 2), generator=torch.Generator().manual_seed(2))
    experts[:, 1] = (experts[:, 0] + 1) % 4
    weights = torch.rand(9, 2, dtype=torch.float64)
    y = b(x, call_for(experts, weights, 4))
    loop = torch.stack([
        sum(weights[t, k] * (b.delta_weight(int(experts[t, k])) @ x[t]) for k in range(2)) for t in range(9)
    ])
    torch.testing.assert_close(y, loop, rtol=1e-12, atol=1e-12)


def test_gram_equals_the_dense_inner_products():
    b = bank()
    dense = torch.stack([b.delta_weight(e).reshape(-1) for e in range(4)])
    torch.testing.assert_close(b.gram(), dense @ dense.T, rtol=1e-4, atol=1e-4)


def test_an_untrained_bank_is_the_base_and_the_adapter_round_trips(tmp_path):
    from srde_testkit import EveryLayerLayout, topk_router_type

    from srde_core.model.adapters import load_adapter, save_adapter
    from srde_core.model.attach import attach_srde

    delta = resolve_component(PLUGINS, "delta", {"name": "lora", "rank": 2}).build()

    def attach(seed):
        return attach_srde(tiny_model("Ministral3ForCausalLM"), layout=EveryLayerLayout(), delta_type=delta,
                           router_type=topk_router_type(), seed=seed)

    srde = attach(0)
    ids = input_ids()
    srde.set_enabled(False)
    base = logits(srde.model, ids)
    srde.set_enabled(True)
    assert torch.equal(logits(srde.model, ids), base)
    with torch.no_grad():
        for name, p in srde.trainable_parameters().items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    trained = logits(srde.model, ids)
    assert not torch.allclose(trained, base)
    path = save_adapter(tmp_path / "a.safetensors", srde, base_model_id="b", recipe_hash="h")
    other = attach(1)
    load_adapter(path, other, base_model_id="b")
    assert torch.equal(logits(other.model, ids), trained)
