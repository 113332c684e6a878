"""Phase 1 (`srde_plugins.trainers` `expert_pretrain`): forced routing by domain, banks only, and a
router warm start that routes each domain to its expert."""

from __future__ import annotations

import textwrap

import pytest
import torch

from srde_core.model.context import ForwardContext
from srde_plugins.trainers.expert_pretrain import domain_assignment, layer_centroids, warm_start_routers, warm_start_rows


@pytest.fixture(scope="module")
def phase1_run(tmp_path_factory, plugins):
    from conftest import RECIPES, run_recipe_in

    workdir = tmp_path_factory.mktemp("phase1")
    recipe = workdir / "phase1.toml"
    recipe.write_text(textwrap.dedent(f"""
        extends = "{RECIPES / 'micro.toml'}"
        name = "phase1"
        [srde]
        layout = {{ name = "uniform", num_experts = 6, top_k = 1 }}
        [[phases]]
        name = "base"
        trainer = "base_pretrain"
        steps = 30
        batch_size = 16
        lr = 3e-3
        [[phases]]
        name = "pretrain"
        trainer = {{ name = "expert_pretrain", warm_start_examples = 16 }}
        sampler = "domain_balanced"
        steps = 4
        batch_size = 8
        lr = 1e-2
    """))
    return run_recipe_in(workdir, recipe, plugins)


def test_every_example_is_routed_to_its_domains_expert():
    plans = [type("Plan", (), {"layer": 0, "num_experts": 4})(), type("Plan", (), {"layer": 3, "num_experts": 2})()]
    forced = domain_assignment(torch.tensor([0, 1, 5, 2]), plans)
    assert forced[0].tolist() == [0, 1, 1, 2] and forced[3].tolist() == [0, 1, 1, 0]


def test_phase1_trains_the_banks_with_forced_routes_and_leaves_router_training_out(phase1_run):
    run = phase1_run
    experts = run.experts
    batch = {k: v for k, v in __import__("srde_core.data.collate", fromlist=["collate"]).collate(
        run.data.train.select(range(8)), run.tokenizer.pad_id, "answer", run.data.domains).items()}
    context = ForwardContext(domain_ids=batch["domain_ids"], forced_experts=domain_assignment(batch["domain_ids"], experts.plans))
    with torch.no_grad(), experts.forward_context(context):
        run.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    per_token = batch["domain_ids"].repeat_interleave(batch["input_ids"].shape[1])
    for routing in context.routings.values():
        assert torch.equal(routing.experts[:, 0], per_token % 6)
    values = [p for n, p in experts.trainable_parameters().items() if n.endswith(".values")]
    assert any(torch.count_nonzero(v) > 0 for v in values)  # the banks trained


def test_the_warm_start_routes_most_tokens_of_a_domain_to_its_expert(phase1_run):
    run, experts = phase1_run, phase1_run.experts
    sums, counts, samples = layer_centroids(run, experts, warm_start_rows(run, 16), batch_size=8)
    centroids = {layer: (total / counts[:, None]).float() for layer, total in sums.items()}
    for layer, mlp in experts.layers.items():
        c = centroids[layer] - centroids[layer].mean(0)
        routed = mlp.router(centroids[layer].to(next(mlp.router.parameters()).device), ForwardContext())
        assert routed.experts[:, 0].tolist() == list(range(6)), f"layer {layer}: {routed.experts[:, 0].tolist()}"
        assert c.norm(dim=1).min() > 0


def domain_sorted(run):
    """``run`` with its training rows sorted by domain (a user's JSONL written domain by domain)."""
    import copy

    sorted_run = copy.copy(run)
    sorted_run.data = copy.copy(run.data)
    sorted_run.data.train = run.data.train.sort("domain")
    return sorted_run


def test_the_warm_start_draws_every_domain_from_a_domain_sorted_file(phase1_run):
    """The first rows of a file sorted by domain hold one or two domains; the warm start used to
    read them, leaving the other domains' gate rows at zero without a word."""
    run = domain_sorted(phase1_run)
    rows = warm_start_rows(run, 5)
    domains = [run.data.train[i]["domain"] for i in rows]
    assert sorted(set(domains)) == sorted(run.data.domains) and len(rows) == 5 * len(run.data.domains)
    assert warm_start_rows(run, 5) == rows  # seeded: every process and a resumed run draw the same
    before = {n: p.detach().clone() for n, p in run.experts.trainable_parameters().items() if n.startswith("routers.")}
    try:
        missing = warm_start_routers(run, run.experts, 5, batch_size=7)
        assert missing == []
        for mlp in run.experts.layers.values():
            gate = next(mlp.router.parameters())
            assert bool((gate.norm(dim=1) > 0).all()), "a domain's expert got a zero gate row"
    finally:
        with torch.no_grad():
            for name, p in run.experts.trainable_parameters().items():
                if name in before:
                    p.copy_(before[name])


def test_a_domain_without_training_rows_gets_no_warm_start_direction_and_is_named(phase1_run):
    """A domain that has eval rows but no training rows has no centroid: it is named (the trainer
    logs a warning line) and leaves the other experts' directions as they are, instead of turning
    a zero centroid into a direction."""
    import copy

    run = copy.copy(phase1_run)
    run.data = copy.copy(phase1_run.data)
    run.data.domains = [*phase1_run.data.domains, "ghost"]
    before = {n: p.detach().clone() for n, p in run.experts.trainable_parameters().items() if n.startswith("routers.")}
    try:
        missing = warm_start_routers(run, run.experts, 4, batch_size=8)
        assert missing == ["ghost"]
        for mlp in run.experts.layers.values():
            gate = next(mlp.router.parameters())
            assert bool(torch.isfinite(gate).all()) and bool((gate.norm(dim=1) > 0).all())
    finally:
        with torch.no_grad():
            for name, p in run.experts.trainable_parameters().items():
                if name in before:
                    p.copy_(before[name])


def test_warm_start_centroids_of_the_labelled_tokens_average_only_those(phase1_run):
    """``warm_start_tokens = "labelled"``: each domain's centroid sums the inputs of its labelled
    (answer) tokens only, fewer than its real tokens, and differs from the all-token centroid."""
    import copy

    from srde_core.data.collate import IGNORE_INDEX, collate

    run = copy.copy(phase1_run)
    data = phase1_run.recipe.data.model_copy(update={"loss_on": "answer"})
    run.recipe = phase1_run.recipe.model_copy(update={"data": data})
    rows = warm_start_rows(run, 3)
    batch = collate(run.data.train.select(rows), run.tokenizer.pad_id, "answer", run.data.domains)
    labelled = torch.zeros(len(run.data.domains), dtype=torch.float64)
    real = torch.zeros_like(labelled)
    for ids, mask, labels in zip(batch["domain_ids"], batch["attention_mask"], batch["labels"]):
        labelled[ids] += float((labels != IGNORE_INDEX).sum())
        real[ids] += float(mask.sum())
    every_sums, every_counts, _ = layer_centroids(run, run.experts, rows, batch_size=4)
    sums, counts, _ = layer_centroids(run, run.experts, rows, batch_size=4, labelled_only=True)
    assert torch.equal(every_counts, real) and torch.equal(counts, labelled)
    assert bool((counts > 0).all()) and bool((counts < every_counts).all())
    layer = next(iter(sums))
    assert not torch.allclose(sums[layer] / counts[:, None], every_sums[layer] / every_counts[:, None])
