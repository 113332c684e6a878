"""The ``sparse`` delta with block positions (``block = [bh, bw]``) against the dense reference,
and its selection, storage, save/load and errors."""

from __future__ import annotations

import pytest
import torch

from srde_testkit import make_router
from test_exactness import GatedMLP, assert_matches

from srde_core.errors import SRDEError
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component
from srde_plugins.deltas.sparse.bank import SparseDeltaBank
from srde_plugins.deltas.sparse.block import BlockSparseDeltaBank, block_norms

PLUGINS = load_plugins()


def delta_type(block, selector="magnitude", density=0.2):
    spec = {"name": "sparse", "density": density, "selector": selector, "block": list(block)}
    return resolve_component(PLUGINS, "delta", spec).build()


def build(block, selector, hidden, intermediate, experts, top_k, *, seed=0, trained=True, bias=False):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = GatedMLP(hidden, intermediate, bias).requires_grad_(False)
    delta = delta_type(block, selector)
    banks = {name: delta.make_bank(getattr(base, name).weight.detach(), experts, generator) for name in PROJECTIONS}
    mlp = SRDEMLP(base, make_router(hidden, experts, top_k, seed), banks)
    if trained:
        with torch.no_grad():
            for bank in banks.values():
                for name in bank.trainable_names:
                    bank.get_parameter(name).normal_(0.0, 0.5, generator=generator)
    return mlp


SELECTORS = ["magnitude", {"name": "magnitude", "assignment": "interleaved"}, "random"]
SELECTOR_IDS = ["magnitude", "interleaved", "random"]
# (block, hidden, intermediate, experts, top_k): square and one-sided blocks, k = 1, 2 and E.
CASES = [
    ((2, 2), 16, 40, 4, 1),
    ((4, 4), 16, 40, 3, 2),
    ((1, 4), 12, 12, 5, 5),
    ((4, 1), 20, 36, 4, 2),
    ((8, 8), 8, 24, 1, 1),
]


@pytest.mark.parametrize("selector", SELECTORS, ids=SELECTOR_IDS)
@pytest.mark.parametrize(("block", "hidden", "intermediate", "experts", "top_k"), CASES)
def test_block_fast_path_matches_reference_float32(selector, block, hidden, intermediate, experts, top_k):
    mlp = build(block, selector, hidden, intermediate, experts, top_k)
    assert all(isinstance(b, BlockSparseDeltaBank) for b in mlp.banks.values())
    x = torch.randn(3, 7, hidden, generator=torch.Generator().manual_seed(2))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selector", SELECTORS, ids=SELECTOR_IDS)
@pytest.mark.parametrize("block", [(2, 2), (4, 2)])
def test_block_fast_path_matches_reference_float64(selector, block):
    mlp = build(block, selector, 20, 36, 4, 3, bias=True).double()
    x = torch.randn(2, 9, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # The router produces float32 gate weights by design, which bounds the agreement.
    assert_matches(mlp, x, rtol=1e-6, atol=1e-7)


def test_block_fast_path_matches_reference_bfloat16():
    mlp = build((4, 4), "magnitude", 32, 48, 4, 2)
    mlp.base.to(torch.bfloat16)  # as attached to a bf16 model: base bf16, routers and banks fp32
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert_matches(mlp, x, rtol=2.5e-2, atol=2.5e-2, compare_dtype=torch.float32)


def test_block_subset_of_projections():
    torch.manual_seed(0)
    base = GatedMLP(16, 24).requires_grad_(False)
    delta = delta_type((4, 2), "random")
    banks = {name: delta.make_bank(getattr(base, name).weight, 4, torch.Generator().manual_seed(0)) for name in ("up_proj", "down_proj")}
    with torch.no_grad():
        for bank in banks.values():
            bank.values.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    mlp = SRDEMLP(base, make_router(16, 4, 2, 0), banks)
    assert_matches(mlp, torch.randn(11, 16, generator=torch.Generator().manual_seed(6)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_block", [0, 10**9], ids=["by-slabs", "by-rows"])
def test_block_kernel_is_exact_in_float64_with_float64_gates(min_block, monkeypatch):
    """With the gate weights in float64 too, both block kernels (slabs, rows) agree with dense
    products to 1e-12."""
    from srde_plugins.deltas.sparse import block
    from srde_plugins.deltas.sparse.block import routed_block_delta

    monkeypatch.setattr(block, "TOKEN_MAJOR_MIN_BLOCK", min_block)

    generator = torch.Generator().manual_seed(4)
    experts, (bh, bw), out_features, in_features = 3, (2, 4), 6, 8
    blocks = torch.tensor([[0, 3], [1, 4], [2, 5]])  # grid 3 x 2; expert 1 gets no tokens below
    rows, cols = blocks // 2, blocks % 2
    values = torch.randn(experts, 2, bh, bw, dtype=torch.float64, generator=generator, requires_grad=True)
    x = torch.randn(5, in_features, dtype=torch.float64, generator=generator, requires_grad=True)
    tokens, offsets = torch.tensor([0, 1, 4, 0, 2, 3, 4]), [0, 3, 3, 7]
    weights = torch.rand(7, dtype=torch.float64, generator=generator, requires_grad=True)
    dense = torch.zeros(experts, 3, 2, bh, bw, dtype=torch.float64)
    dense = dense.view(experts, 6, bh, bw).index_put((torch.arange(3)[:, None], blocks), values)
    dense = dense.view(experts, 3, 2, bh, bw).transpose(2, 3).reshape(experts, out_features, in_features)
    expected = torch.zeros(5, out_features, dtype=torch.float64)
    for e in range(experts):
        tok, w = tokens[offsets[e]:offsets[e + 1]], weights[offsets[e]:offsets[e + 1]]
        expected = expected.index_add(0, tok, w[:, None] * (x[tok] @ dense[e].T))
    grad = torch.randn(5, out_features, dtype=torch.float64, generator=generator)
    want = torch.autograd.grad((expected * grad).sum(), (x, values, weights))
    y = routed_block_delta(x, values, rows, cols, out_features, tokens, weights, offsets)
    got = torch.autograd.grad((y * grad).sum(), (x, values, weights))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1][1], torch.zeros_like(got[1][1]))  # the idle expert


def test_block_experts_without_tokens_get_zero_gradient():
    mlp = build((4, 4), "random", 16, 28, 6, 2)
    starved = [4, 5]
    with torch.no_grad():
        mlp.router.gate.weight[starved, 0] = -100.0
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 3.0
    assert mlp.router(x).load()[starved].sum() == 0
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    mlp(x).sum().backward()
    for bank in mlp.banks.values():
        for name in bank.trainable_names:
            grad = bank.get_parameter(name).grad
            assert torch.equal(grad[starved], torch.zeros_like(grad[starved]))


def test_untrained_block_bank_is_exactly_the_base():
    mlp = build((4, 4), "magnitude", 16, 40, 4, 2, trained=False)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mlp(x), mlp.base(x))


def test_training_changes_only_the_selected_blocks():
    mlp = build((4, 2), "random", 16, 40, 4, 2, trained=False)
    optimizer = torch.optim.SGD([p for p in mlp.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(8)
    for _ in range(3):
        optimizer.zero_grad()
        x = torch.randn(30, 16, generator=generator)
        (mlp(x) * torch.randn(30, 16, generator=generator)).sum().backward()
        optimizer.step()
    for bank in mlp.banks.values():
        for e in range(bank.num_experts):
            flat = bank.delta_weight(e).flatten()
            selected = torch.zeros_like(flat, dtype=torch.bool)
            selected[bank.entry_positions()[e]] = True
            assert torch.count_nonzero(flat[~selected]) == 0
            assert torch.count_nonzero(flat[selected]) > 0
            # entry_positions is aligned with the values, block by block
            torch.testing.assert_close(flat[bank.entry_positions()[e]], bank.effective_values()[e].flatten())


def test_magnitude_picks_the_blocks_of_largest_norm_and_density_counts_entries():
    weight = torch.randn(32, 48, generator=torch.Generator().manual_seed(9))
    bank = delta_type((8, 4), density=0.25).make_bank(weight, 3, torch.Generator())
    norms = block_norms(weight, (8, 4))
    assert norms.shape == (4, 12)
    torch.testing.assert_close(norms[1, 2], weight[8:16, 8:12].norm())
    expected = torch.sort(torch.topk(norms.flatten(), 12).indices).values
    assert bank.blocks.shape == (1, 12) and torch.equal(bank.blocks[0], expected)  # shared: stored once
    entries = sum(p.numel() for p in bank.parameters()) // 2
    flat = delta_type((1, 1), density=0.25).make_bank(weight, 3, torch.Generator())
    assert entries == flat.values.numel() == 3 * 0.25 * weight.numel()


def test_block_1x1_is_the_unstructured_bank():
    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(10))
    default = resolve_component(PLUGINS, "delta", {"name": "sparse", "density": 0.2}).build()
    bank = delta_type((1, 1)).make_bank(weight, 3, torch.Generator())
    assert type(bank) is SparseDeltaBank
    assert torch.equal(bank.positions, default.make_bank(weight, 3, torch.Generator()).positions)


@pytest.mark.parametrize("selector", ["magnitude", "random"])
def test_block_adapter_saves_and_loads(selector):
    source = build((4, 4), selector, 16, 24, 3, 2, seed=1)
    target = build((4, 4), "random", 16, 24, 3, 2, seed=2)  # other blocks, stored per expert
    target.base.load_state_dict(source.base.state_dict())
    target.router.load_state_dict(source.router.state_dict())
    state = source.banks.state_dict()
    assert set(source.banks["up_proj"].state_dict()) == {"blocks", "active", "values", "importance"}
    assert state["up_proj.blocks"].shape[0] == (1 if selector == "magnitude" else 3)
    target.banks.load_state_dict(state)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(11))
    assert torch.equal(target(x), source(x))


def test_block_errors_are_one_clear_line():
    with pytest.raises(SRDEError, match=r"srde.delta.block: block \[4, 4\] does not tile a \(10, 16\) weight"):
        delta_type((4, 4)).make_bank(torch.randn(10, 16), 2, torch.Generator())
    bank = delta_type((2, 2)).make_bank(torch.randn(8, 8), 2, torch.Generator())
    with pytest.raises(ValueError, match="blocks must lie in"):
        bank.set_positions(torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="unique and sorted"):
        bank.set_positions(torch.tensor([[2, 1], [1, 2]]))


@pytest.mark.parametrize("block", [[2, 2], [1, 1]])
def test_adapters_round_trip_through_the_adapter_file(tmp_path, block):
    """Block banks, and unstructured banks whose shared positions are stored once, save to an
    adapter file and load into a model with other positions."""
    from srde_testkit import EveryLayerLayout, input_ids, logits, perturb, tiny_model, topk_router_type

    from srde_core.model.adapters import load_adapter, save_adapter
    from srde_core.model.attach import ComponentSpec, attach_srde

    def make(selector, seed):
        spec = {"name": "sparse", "density": 0.2, "selector": selector, "block": block}
        return attach_srde(
            tiny_model("Ministral3ForCausalLM"), layout=EveryLayerLayout(),
            delta_type=resolve_component(PLUGINS, "delta", spec).build(), router_type=topk_router_type(),
            seed=seed, components={"delta": ComponentSpec.of("sparse", {"density": 0.2, "block": block})},
        )

    trained = make("magnitude", 0)
    perturb(trained)
    ids = input_ids()
    expected = logits(trained.model, ids)
    path = save_adapter(tmp_path / "adapter.safetensors", trained, base_model_id="base", recipe_hash="h")
    fresh = make("random", 1)
    load_adapter(path, fresh, base_model_id="base")
    torch.testing.assert_close(logits(fresh.model, ids), expected, rtol=0, atol=0)
