"""Fast path == dense reference, for every registered delta type and selector.

The dense reference (:func:`srde_core.model.reference.dense_reference`) materialises
``W + sum_k w_k dW_{e_k}`` per token; the SRDE layer must agree with it in its output and in the
gradients of everything that trains (bank parameters, router gate) and of its input.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from srde_testkit import make_router

from srde_core.model.context import ForwardContext
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.model.reference import dense_reference
from srde_core.params import slot_fields
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component
from srde_plugins.deltas.sparse import SparseDeltaParams
from srde_plugins.deltas.sparse.bank import SparseDeltaBank
from srde_plugins.deltas.sparse.kernels import build_csr_structure, routed_sparse_delta

PLUGINS = load_plugins()
REGISTRIES = PLUGINS.registries
#: Tests use a higher density than the default so that small weights get many positions.
TEST_DENSITY = 0.2
#: The budget of every token (ForwardContext.budget) where a test sets no context: banks that vary their
#: size per token (dynamic sparsity) then use part of their entries, at one fixed level; others ignore it.
TEST_BUDGET = 0.7


def _uses_selector(delta: str) -> bool:
    return "selector" in slot_fields(REGISTRIES["delta"].get(delta).params)


def _combos() -> list[tuple[str, str | None]]:
    combos = []
    for delta in REGISTRIES["delta"]:
        if _uses_selector(delta.name):
            combos += [(delta.name, selector.name) for selector in REGISTRIES["selector"]]
        else:
            combos.append((delta.name, None))
    return combos


def _delta_type(name: str, selector: str | None = None, **args):
    fields = REGISTRIES["delta"].get(name).params.model_fields
    spec = {"name": name, **({"density": TEST_DENSITY} if "density" in fields else {}), **args}
    if selector is not None:
        spec["selector"] = selector
    return resolve_component(PLUGINS, "delta", spec).build()


COMBOS = _combos()
COMBO_IDS = [f"{d}-{s}" if s else d for d, s in COMBOS]


from srde_core.testing import GatedMLP  # noqa: E402  (the kit's: what an SRDE layer wraps)


def build_layer(
    delta: str,
    selector: str | None,
    hidden: int,
    intermediate: int,
    num_experts: int,
    top_k: int,
    *,
    seed: int = 0,
    projections=PROJECTIONS,
    bias: bool = False,
    trained: bool = True,
    gate: str = "auto",
) -> SRDEMLP:
    """A frozen random MLP with SRDE banks; ``trained`` fills every trainable tensor randomly."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = GatedMLP(hidden, intermediate, bias).requires_grad_(False)
    delta_type = _delta_type(delta, selector)
    router = make_router(hidden, num_experts, top_k, seed, gate=gate)
    banks = {
        name: delta_type.make_bank(getattr(base, name).weight.detach(), num_experts, generator)
        for name in projections
    }
    mlp = SRDEMLP(base, router, banks)
    if trained:
        with torch.no_grad():
            for bank in banks.values():
                for name in bank.trainable_names:
                    bank.get_parameter(name).normal_(0.0, 0.5, generator=generator)
    return mlp


def trainable_tensors(mlp: SRDEMLP) -> dict[str, torch.Tensor]:
    tensors = {"router.gate.weight": mlp.router.gate.weight}
    for proj, bank in mlp.banks.items():
        for name in bank.trainable_names:
            tensors[f"{proj}.{name}"] = bank.get_parameter(name)
    return tensors


def run(mlp: SRDEMLP, forward, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Output and gradients (input + every trainable tensor) of ``forward(mlp, x)``."""
    x = x.detach().clone().requires_grad_(True)
    params = trainable_tensors(mlp)
    for p in params.values():
        p.grad = None
    y = forward(mlp, x)
    (y.to(grad.dtype) * grad).sum().backward()
    grads = {"x": x.grad.clone()}
    # A parameter that only an auxiliary loss trains (a difficulty head) gets no gradient from either path.
    grads.update({name: p.grad.clone() for name, p in params.items() if p.grad is not None})
    return y.detach(), grads


def fast(mlp, x):
    return mlp(x)


def assert_matches(mlp: SRDEMLP, x: torch.Tensor, *, rtol: float, atol: float, compare_dtype=None):
    compare_dtype = compare_dtype or x.dtype
    grad = torch.randn(*x.shape, generator=torch.Generator().manual_seed(1)).to(compare_dtype)
    context = mlp.context.current or ForwardContext(budget=torch.tensor([TEST_BUDGET]))
    with mlp.context.using(context):
        y_fast, g_fast = run(mlp, fast, x, grad)
        y_ref, g_ref = run(mlp, dense_reference, x, grad)
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y_fast.to(compare_dtype), y_ref.to(compare_dtype), rtol=rtol, atol=atol * scale)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        ref = g_ref[name].to(compare_dtype)
        torch.testing.assert_close(
            g_fast[name].to(compare_dtype), ref, rtol=rtol, atol=atol * max(ref.abs().max().item(), 1e-12),
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )


# (hidden, intermediate, experts, top_k): non-square projections both ways, k = 1, 2 and E.
SHAPES = [
    (16, 40, 4, 1),
    (24, 10, 3, 2),
    (12, 12, 5, 5),
    (20, 36, 8, 2),
    (8, 24, 1, 1),
]


@pytest.mark.parametrize(("delta", "selector"), COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize(("hidden", "intermediate", "experts", "top_k"), SHAPES)
def test_fast_path_matches_reference_float32(delta, selector, hidden, intermediate, experts, top_k):
    mlp = build_layer(delta, selector, hidden, intermediate, experts, top_k)
    x = torch.randn(3, 7, hidden, generator=torch.Generator().manual_seed(2))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("delta", "selector"), COMBOS, ids=COMBO_IDS)
def test_fast_path_matches_reference_float64(delta, selector):
    mlp = build_layer(delta, selector, 20, 36, 6, 3, bias=True).double()
    x = torch.randn(2, 9, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # The router produces float32 gate weights by design, which bounds the agreement.
    assert_matches(mlp, x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("delta", "selector"), COMBOS, ids=COMBO_IDS)
def test_fast_path_matches_reference_bfloat16(delta, selector):
    mlp = build_layer(delta, selector, 32, 48, 4, 2)
    mlp.base.to(torch.bfloat16)  # as attached to a bf16 model: base bf16, routers and banks fp32
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    # Measured worst error max|fast - ref| / (scale + |ref|) over the output and every gradient:
    # 1.28e-2 (lora: gate_proj.lora_A), 5.8e-3 (sparse-magnitude), 5.0e-3 (sparse-random); about 2x.
    assert_matches(mlp, x, rtol=2.5e-2, atol=2.5e-2, compare_dtype=torch.float32)


@pytest.mark.parametrize(("delta", "selector"), COMBOS, ids=COMBO_IDS)
def test_experts_without_tokens(delta, selector):
    """Experts that receive no token contribute nothing and get exactly zero gradient."""
    hidden, experts = 16, 6
    mlp = build_layer(delta, selector, hidden, 28, experts, 2)
    starved = [4, 5]
    with torch.no_grad():
        mlp.router.gate.weight[starved, 0] = -100.0
    x = torch.randn(40, hidden, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 3.0  # a constant feature: the starved experts' logits are always far below the rest
    routing = mlp.router(x)
    assert routing.load()[starved].sum() == 0 and (routing.load()[:4] > 0).all()
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    mlp(x).sum().backward()
    for bank in mlp.banks.values():
        for name in bank.trainable_names:
            grad = bank.get_parameter(name).grad
            if grad is not None and grad.shape[:1] == (experts,):
                assert torch.equal(grad[starved], torch.zeros_like(grad[starved]))


@pytest.mark.parametrize(("delta", "selector"), COMBOS, ids=COMBO_IDS)
def test_subset_of_projections(delta, selector):
    mlp = build_layer(delta, selector, 16, 24, 4, 2, projections=("up_proj", "down_proj"))
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(6))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("delta", "selector"), COMBOS, ids=COMBO_IDS)
def test_untrained_bank_is_exactly_the_base(delta, selector):
    mlp = build_layer(delta, selector, 16, 40, 4, 2, trained=False)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(7), requires_grad=True)
    x_base = x.detach().clone().requires_grad_(True)
    y = mlp(x)
    y_base = mlp.base(x_base)
    assert torch.equal(y, y_base)
    for e in range(4):
        for name, bank in mlp.banks.items():
            live = {"weight": getattr(mlp.base, name).weight} if bank.weight_dependent else {}
            assert torch.count_nonzero(bank.delta_weight(e, **live)) == 0
    y.sum().backward()
    y_base.sum().backward()
    assert torch.equal(x.grad, x_base.grad)


@pytest.mark.parametrize("selector", [c.name for c in REGISTRIES["selector"]])
def test_training_never_touches_unselected_positions(selector):
    mlp = build_layer("sparse", selector, 16, 40, 4, 2, trained=False)
    optimizer = torch.optim.SGD([p for p in mlp.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(8)
    for _ in range(3):
        optimizer.zero_grad()
        x = torch.randn(30, 16, generator=generator)
        (mlp(x) * torch.randn(30, 16, generator=generator)).sum().backward()
        optimizer.step()
    for bank in mlp.banks.values():
        assert isinstance(bank, SparseDeltaBank)
        for e in range(bank.num_experts):
            flat = bank.delta_weight(e).flatten()
            selected = torch.zeros_like(flat, dtype=torch.bool)
            selected[bank.positions[e]] = True
            assert torch.count_nonzero(flat[~selected]) == 0
            assert torch.count_nonzero(flat[selected]) > 0  # it did train


def test_set_positions_keeps_kept_entries_and_stays_exact():
    mlp = build_layer("sparse", "random", 16, 24, 3, 2)
    bank = mlp.banks["up_proj"]
    numel = bank.out_features * bank.in_features
    before = torch.stack([bank.delta_weight(e).detach().flatten() for e in range(3)])
    generator = torch.Generator().manual_seed(9)
    new_positions, kept = [], []
    for e in range(3):
        keep = bank.positions[e][::2].clone()
        unselected = torch.ones(numel, dtype=torch.bool)
        unselected[bank.positions[e]] = False
        candidates = unselected.nonzero().flatten()
        fresh = candidates[torch.randperm(len(candidates), generator=generator)[: bank.count - len(keep)]]
        new_positions.append(torch.sort(torch.cat([keep, fresh])).values)
        kept.append(keep)
    bank.set_positions(torch.stack(new_positions))
    assert torch.equal(bank.positions, torch.stack(new_positions))
    for e in range(3):
        expected = torch.zeros(numel)
        expected[kept[e]] = before[e][kept[e]]  # kept entries keep their delta, new ones start at 0
        assert torch.equal(bank.delta_weight(e).detach().flatten(), expected)
    x = torch.randn(13, 16, generator=generator)
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_loading_state_rebuilds_index_structures():
    source = build_layer("sparse", "random", 16, 24, 3, 2, seed=1)
    target = build_layer("sparse", "random", 16, 24, 3, 2, seed=2)  # other positions
    target.base = copy.deepcopy(source.base)
    target.router.load_state_dict(source.router.state_dict())
    assert not torch.equal(target.banks["gate_proj"].positions, source.banks["gate_proj"].positions)
    target.banks.load_state_dict(source.banks.state_dict())
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(10))
    assert torch.equal(target(x), source(x))
    assert set(source.banks["gate_proj"].state_dict()) == {"positions", "active", "values", "importance"}


@pytest.mark.parametrize(("out_features", "in_features"), [(9, 7), (7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_dense_products(dtype, out_features, in_features):
    """The kernel alone, with and without cached inputs, incl. an expert without tokens and weight
    rows and columns without positions."""
    experts = 4
    generator = torch.Generator().manual_seed(11)
    positions = torch.stack([torch.tensor([0, 3, 5, 40, 62]), torch.tensor([1, 2, 8, 9, 10]),
                             torch.tensor([7, 14, 21, 28, 35]), torch.tensor([50, 51, 52, 53, 54])])
    structure = build_csr_structure(positions, out_features, in_features)
    values = torch.randn(experts, 5, generator=generator, dtype=dtype, requires_grad=True)
    x = torch.randn(6, in_features, generator=generator, dtype=dtype, requires_grad=True)
    # tokens grouped by expert: expert 2 gets none
    tokens = torch.tensor([0, 2, 5, 1, 2, 3, 4, 0, 1, 3, 4, 5])
    offsets = [0, 3, 7, 7, 12]
    weights = torch.rand(12, generator=generator, dtype=dtype, requires_grad=True)
    dense = torch.zeros(experts, out_features * in_features, dtype=dtype)
    dense = dense.scatter(1, positions, values).view(experts, out_features, in_features)
    expected = torch.zeros(6, out_features, dtype=dtype)
    for e in range(experts):
        tok, w = tokens[offsets[e]:offsets[e + 1]], weights[offsets[e]:offsets[e + 1]]
        expected = expected.index_add(0, tok, w[:, None] * (x[tok] @ dense[e].T))
    grad = torch.randn(6, out_features, generator=generator, dtype=dtype)
    want = torch.autograd.grad((expected * grad).sum(), (x, values, weights))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for cache in (True, False):
        y = routed_sparse_delta(x, values, structure, tokens, weights, offsets, cache_inputs=cache)
        got = torch.autograd.grad((y * grad).sum(), (x, values, weights))
        torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)
        assert torch.equal(got[1][2], torch.zeros(5, dtype=dtype))  # the idle expert


def test_kernel_gradients_for_a_subset_of_inputs():
    """Only what is asked for is computed; the rest comes back as None."""
    structure = build_csr_structure(torch.tensor([[0, 4, 9], [2, 3, 11]]), 3, 4)
    x = torch.randn(5, 4)
    values = torch.randn(2, 3, requires_grad=True)
    tokens, offsets = torch.tensor([0, 1, 2, 3, 4, 0]), [0, 4, 6]
    weights = torch.rand(6)
    y = routed_sparse_delta(x, values, structure, tokens, weights, offsets)
    (grad,) = torch.autograd.grad(y.sum(), values)
    assert grad.shape == values.shape and torch.count_nonzero(grad) > 0


@pytest.mark.parametrize("params", [{"cache_inputs": False}, {"init_importance": 2.5}])
def test_sparse_options_stay_exact(params):
    """Recomputing the gathered inputs in backward, or another initial importance, changes no result."""
    params = types.SimpleNamespace(**{"init_importance": 0.0, **params})
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = GatedMLP(16, 28).requires_grad_(False)
    delta = _delta_type("sparse", "random", **vars(params))
    banks = {name: delta.make_bank(getattr(base, name).weight, 4, generator) for name in PROJECTIONS}
    assert all(bool((b.importance == params.init_importance).all()) for b in banks.values())
    with torch.no_grad():
        for bank in banks.values():
            bank.values.normal_(0.0, 0.5, generator=generator)
    mlp = SRDEMLP(base, make_router(16, 4, 2), banks)
    x = torch.randn(17, 16, generator=generator)
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_sparse_delta_positions_and_validation():
    from pydantic import ValidationError

    weight = torch.randn(10, 30)
    bank = _delta_type("sparse", "magnitude", density=0.1).make_bank(weight, 3, torch.Generator())
    assert bank.positions.shape == (3, 30) and bank.positions.dtype == torch.long
    assert torch.count_nonzero(bank.values) == 0
    for bad in ({"density": 0.0}, {"density": 1.5}, {"density": "0.1"}, {"dens": 0.1}):
        with pytest.raises(ValidationError):
            SparseDeltaParams(**bad)
    with pytest.raises(ValueError, match="sorted"):
        bank.set_positions(bank.positions.flip(1))
    with pytest.raises(ValueError, match="rows"):
        bank.set_positions(bank.positions[:2])


# ---- the router's gate normalisations and the combine steps, against the same reference ----------

@pytest.mark.parametrize("gate", ["auto", "softmax_topk", "softmax"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_gate_normalisations_match_the_reference(gate, top_k):
    mlp = build_layer("sparse", "random", 16, 24, 4, top_k, gate=gate)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(12))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    assert_matches(mlp.double(), x.double(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("combine", REGISTRIES["combine"].names())
@pytest.mark.parametrize("top_k", [1, 2])
def test_every_combine_step_matches_the_reference(combine, top_k):
    mlp = build_layer("sparse", "random", 16, 24, 4, top_k)
    step = resolve_component(PLUGINS, "combine", combine).build().make_combine(16, 4, top_k, torch.Generator().manual_seed(3))
    mlp.combine = step
    with torch.no_grad():
        for p in step.parameters():
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(4))
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(13))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    assert_matches(mlp.double(), x.double(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("gate", "learns"), [("auto", True), ("softmax", True), ("softmax_topk", False)])
def test_at_top_1_the_router_learns_from_the_task_unless_the_gate_is_the_topk_softmax(gate, learns):
    """The bug this fixes: with top_k = 1 the softmax over the chosen k is always 1, so the task
    loss gave the router no gradient (recipes/fast.toml runs top-1)."""
    mlp = build_layer("sparse", "magnitude", 16, 24, 4, 1, gate=gate)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(14))
    target = torch.randn(20, 16, generator=torch.Generator().manual_seed(15))
    torch.nn.functional.mse_loss(mlp(x), target).backward()  # the task loss alone, no router loss
    grad = mlp.router.gate.weight.grad
    assert (grad is not None and bool(grad.abs().sum() > 0)) == learns
