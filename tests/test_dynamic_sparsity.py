"""Dynamic sparsity (`srde_plugins.deltas.sparse.dynamic`): per-token entry budgets from the context or a
difficulty head, exact against the dense reference at every budget, fewer entries at lower budgets,
and a head that learns the data's difficulty."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import srde_plugins.deltas.sparse.dynamic  # noqa: F401  (the plugin's package: the meta-test looks for its import)
from srde_core.model.components import BankCall
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing
from srde_core.train.losses import LossInputs
from srde_plugins.deltas.sparse.dynamic import DifficultyLossParams, DynamicSparseParams
from srde_plugins.deltas.sparse.dynamic import bank as dynamic_bank
from srde_plugins.deltas.sparse.dynamic.loss import difficulty

OUT, IN, EXPERTS, TOP_K, TOKENS = 24, 20, 4, 2, 11


def make_bank(plugins, dtype=torch.float32, **args):
    from srde_core.recipe import resolve_component

    spec = {"name": "dynamic_sparse", "min_density": 0.05, "max_density": 0.2, "levels": 3, "selector": "random", **args}
    delta = resolve_component(plugins, "delta", spec).build()
    generator = torch.Generator().manual_seed(0)
    bank = delta.make_bank(torch.randn(OUT, IN, generator=generator), EXPERTS, generator).to(dtype)
    with torch.no_grad():
        bank.values.normal_(0.0, 0.5, generator=generator)
        bank.importance.normal_(0.0, 1.0, generator=generator)
    return bank


def make_routing(dtype, seed=1) -> Routing:
    generator = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOP_K, generator=generator, dtype=dtype).requires_grad_(True)
    probs = torch.full((TOKENS, EXPERTS), 1.0 / EXPERTS, dtype=dtype)
    return Routing(experts=experts, weights=weights, probs=probs, logits=probs.log(), num_experts=EXPERTS)


def top_entries(bank, expert: int, count: int) -> set[int]:
    """The test's own ranking: the ``count`` positions of largest sigmoid(importance) * |value|."""
    with torch.no_grad():
        priority = torch.sigmoid(bank.importance[expert]) * bank.values[expert].abs()
    return set(bank.positions[expert, torch.topk(priority, count).indices].tolist())


def reference(bank, x, routing, budgets) -> torch.Tensor:
    """sum_k w_tk * dW_{e_tk}^(b_t) x_t with the test's own top entries per budget (dense, per token)."""
    values = bank.effective_values()
    counts = bank.level_counts()
    rows = []
    for t in range(x.shape[0]):
        level = int(bank.level_of(budgets[t : t + 1])[0])
        y = x.new_zeros(OUT)
        for k in range(TOP_K):
            e = int(routing.experts[t, k])
            keep = torch.tensor([p in top_entries(bank, e, counts[level]) for p in bank.positions[e].tolist()])
            flat = values.new_zeros(OUT * IN).scatter(0, bank.positions[e][keep], values[e][keep])
            y = y + routing.weights[t, k] * (flat.view(OUT, IN) @ x[t])
        rows.append(y)
    return torch.stack(rows)


def outputs_and_grads(bank, forward, x, routing):
    x = x.detach().clone().requires_grad_(True)
    tensors = {"x": x, "weights": routing.weights, "values": bank.values, "importance": bank.importance}
    for t in tensors.values():
        t.grad = None
    y = forward(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), {name: t.grad.clone() for name, t in tensors.items()}


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("budget", ["low", "middle", "high", "mixed"])
def test_bank_matches_the_dense_reference_of_its_top_entries(plugins, dtype, tol, budget):
    bank = make_bank(plugins, dtype)
    fractions = bank.level_fractions()
    assert bank.level_counts() == [24, 60, 96] and fractions.tolist()[-1] == 1.0
    chosen = {
        "low": torch.full((TOKENS,), float(fractions[0])),
        "middle": torch.full((TOKENS,), 0.7),  # between levels: the largest level that fits (1)
        "high": torch.ones(TOKENS),
        "mixed": fractions[torch.arange(TOKENS) % 3],
    }[budget]
    x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(2), dtype=dtype)
    routing = make_routing(dtype)
    context = ForwardContext(budget=chosen)
    y_fast, g_fast = outputs_and_grads(bank, lambda v: bank(v, BankCall(routing, context)), x, routing)
    y_ref, g_ref = outputs_and_grads(bank, lambda v: reference(bank, v, routing, chosen), x, routing)
    torch.testing.assert_close(y_fast, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=tol, atol=tol * g_ref[name].abs().max().item(),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    # delta_weight at a budget (what the layer's dense reference uses) holds the same entries
    level = int(bank.level_of(chosen[:1])[0])
    for e in range(EXPERTS):
        dense = bank.delta_weight(e, budget=float(chosen[0])).reshape(-1)
        assert set(dense.nonzero().reshape(-1).tolist()) == top_entries(bank, e, bank.level_counts()[level])


def test_layer_matches_the_dense_reference_with_head_and_context_budgets():
    from test_exactness import assert_matches, build_layer

    mlp = build_layer("dynamic_sparse", "magnitude", 20, 36, 6, 2)
    x = torch.randn(3, 7, 20, generator=torch.Generator().manual_seed(3))
    levels = {int(level) for level in mlp.banks["gate_proj"].token_levels(x.reshape(-1, 20), BankCall(None, ForwardContext()))}
    assert len(levels) > 1  # the (randomised) heads spread the tokens over levels
    with mlp.context.using(ForwardContext()):  # no budget: the heads decide
        assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    budget = torch.tensor([0.1, 0.5, 1.0])  # per example
    with mlp.context.using(ForwardContext(budget=budget)):
        assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_a_lower_budget_touches_fewer_entries(plugins, monkeypatch):
    bank = make_bank(plugins)
    calls = []
    kernel = dynamic_bank.routed_sparse_delta

    def counting(x, values, structure, tokens, *args, **kwargs):
        calls.append((values.shape[1], int(structure.col.shape[1]), tokens.numel()))
        return kernel(x, values, structure, tokens, *args, **kwargs)

    monkeypatch.setattr(dynamic_bank, "routed_sparse_delta", counting)
    x = torch.randn(TOKENS, IN)
    routing = make_routing(torch.float32)
    used = {}
    for name, budget in (("low", 0.25), ("high", 1.0)):
        calls.clear()
        bank(x, BankCall(routing, ForwardContext(budget=torch.full((TOKENS,), budget))))
        assert len(calls) == 1 and calls[0][2] == TOKENS * TOP_K  # one bucket with every routed slot
        used[name] = calls[0][:2]
    assert used["low"] == (24, 24) and used["high"] == (96, 96)  # nnz per expert: 0.05 vs 0.2 of 480
    # a budget between levels gets the largest level that fits (budgets are caps)
    assert bank.level_of(torch.tensor([0.1, 0.25, 0.6, 0.7, 0.99, 1.0])).tolist() == [0, 0, 0, 1, 1, 2]
    calls.clear()
    bank(x, BankCall(routing, ForwardContext(budget=bank.level_fractions()[torch.arange(TOKENS) % 3])))
    assert [c[0] for c in calls] == [24, 60, 96] and sum(c[2] for c in calls) == TOKENS * TOP_K


def test_ranking_refreshes_after_refresh_every_updates(plugins):
    bank = make_bank(plugins, refresh_every=2)
    first = bank.ranked_levels()[0][0].clone()
    low = bank.level_counts()[0]

    def promote():  # make the entries outside expert 0's low level the largest
        with torch.no_grad():
            outside = torch.ones(bank.count, dtype=torch.bool)
            outside[bank.ranked_levels()[0][0][0]] = False
            bank.values[0, outside] *= 100.0

    promote()
    assert torch.equal(bank.ranked_levels()[0][0], first)  # one update: kept
    promote()
    second = bank.ranked_levels()[0][0]
    assert not torch.equal(second[0], first[0]) and second.shape == (EXPERTS, low)
    assert set(bank.positions[0, second[0]].tolist()) == top_entries(bank, 0, low)
    bank.set_positions(bank.positions)  # a change of positions re-ranks at once
    assert bank._levels is not None


def test_head_trains_toward_the_difficulty_column(plugins):
    torch.manual_seed(0)
    bank = make_bank(plugins)
    loss_fn = difficulty(DifficultyLossParams())
    batch_size, seq = 12, 4
    level = torch.arange(batch_size) % 3 + 1  # the data's levels 1, 2, 3
    level[0] = 0  # "none given": ignored
    x = torch.randn(batch_size, seq, IN)
    x[..., 0] += (level.float() - 2.0)[:, None] * 2.0  # one feature tells the difficulty
    x = x.reshape(-1, IN)
    routing = make_routing(torch.float32)
    routing = Routing(routing.experts.repeat(5, 1)[: batch_size * seq], routing.weights.detach().repeat(5, 1)[: batch_size * seq],
                      routing.probs.repeat(5, 1)[: batch_size * seq], routing.logits.repeat(5, 1)[: batch_size * seq], EXPERTS)
    optimiser = torch.optim.Adam(bank.head.parameters(), lr=0.05)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    mask[:, -1] = 0  # padding: ignored
    losses = []
    for _ in range(150):
        context = ForwardContext(difficulty=level)
        bank(x, BankCall(routing, context))
        inputs = LossInputs(hidden=torch.zeros(1), lm_head=None, labels=torch.zeros(1), context=context,
                            batch={"difficulty": level, "attention_mask": mask})
        loss = loss_fn(inputs)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0]
    levels = bank.token_levels(x, BankCall(routing, ForwardContext())).view(batch_size, seq)[:, :-1]  # real tokens
    for d, expected in ((1, 0), (2, 1), (3, 2)):
        assert (levels[level == d] == expected).float().mean() > 0.9
    assert bank.values.grad is None  # the loss trains the head only
    # Without a difficulty column the loss is 0 and the head keeps its prediction.
    context = ForwardContext()
    bank(x, BankCall(routing, context))
    assert float(loss_fn(LossInputs(hidden=torch.zeros(1), lm_head=None, labels=torch.zeros(1), context=context, batch={}))) == 0.0


def test_params_reject_min_above_max():
    with pytest.raises(ValueError, match="min_density"):
        DynamicSparseParams(min_density=0.05, max_density=0.02)
    with pytest.raises(ValueError, match="hardest"):
        DifficultyLossParams(easiest=3, hardest=3)


def test_bad_density_order_in_a_recipe_is_one_line(tmp_path, micro_recipe, capsys):
    from srde_core.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(f'extends = "{micro_recipe.as_posix()}"\n[srde]\n'
                   'delta = { name = "dynamic_sparse", min_density = 0.1, max_density = 0.05 }\n')
    assert main(["validate", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "srde.delta" in lines[0] and "min_density" in lines[0]


def test_a_run_trains_the_heads_and_saves_them(tmp_path, plugins, micro_recipe):
    from conftest import run_recipe_in

    overrides = [
        'srde.delta={ name = "dynamic_sparse", min_density = 0.02, max_density = 0.08 }',
        'phases.experts.losses=["lm", { name = "difficulty", weight = 0.5 }]',
        "phases.base.steps=1", "phases.experts.steps=3", "phases.experts.log_every=1",
    ]
    run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    run_dir = tmp_path / "runs" / "micro"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    experts = [m for m in metrics if m.get("phase") == "experts" and "difficulty" in m]
    assert experts and all(m["difficulty"] > 0 for m in experts)  # the generated corpus has difficulty 1-3
    adapter = load_file(run_dir / "adapter.safetensors")
    heads = [v for k, v in adapter.items() if k.endswith("head.weight")]
    assert heads and all(bool(h.abs().sum() > 0) for h in heads)  # trained away from their zero start


def test_difficulty_loss_is_the_mean_bce_over_real_tokens_with_a_known_level():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5])  # 3 examples x 2 tokens
    other = torch.tensor([0.0, 0.3, -0.2, 0.1, 0.4, 0.9])
    key = dynamic_bank.DIFFICULTY_RECORD
    context = ForwardContext(records={(key, "a"): logits, (key, "b"): other})
    level = torch.tensor([1, 3, 0])  # targets 0 and 1; example 2 has none
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])  # token 3 is padding
    inputs = LossInputs(hidden=torch.zeros(1), lm_head=None, labels=torch.zeros(1), context=context,
                        batch={"difficulty": level, "attention_mask": mask})
    keep, target = torch.tensor([0, 1, 2]), torch.tensor([0.0, 0.0, 1.0])
    expected = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(v[keep], target) for v in (logits, other)]).mean()
    torch.testing.assert_close(difficulty(DifficultyLossParams())(inputs), expected)


def test_the_ablation_recipe_loads_with_tinys_density(plugins):
    from conftest import REPO

    from srde_core.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "ablations" / "dynamic.toml", plugins, [])
    tiny = load_recipe(REPO / "recipes" / "tiny.toml", plugins, [])
    assert recipe.name == "ablation-dynamic" and recipe.srde.delta.name == "dynamic_sparse"
    assert recipe.srde.delta.params.max_density == tiny.srde.delta.params.density
    assert "difficulty" in [loss.name for loss in recipe.phases[-1].losses]
