"""Evaluation of a finished run: per-domain loss, accuracy, routing analysis, ``srde eval/generate``."""

from __future__ import annotations

import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from srde_core.cli import main
from srde_core.data.collate import IGNORE_INDEX
from srde_core.evaluate import evaluation_state
from srde_core.evaluate.accuracy import answer_accuracy, is_correct
from srde_core.evaluate.generation import generate_from_run, greedy_generate
from srde_core.evaluate.losses import domain_losses, eval_batches, eval_subset, overall_loss
from srde_core.evaluate.report import evaluate, print_loss_summary
from srde_core.evaluate.routing import (
    RoutingCounter,
    baseline_purity,
    expert_purity,
    normalized_mutual_information,
    purity,
)
from srde_core.model.context import ForwardContext
from srde_core.run import open_finished_run
from srde_plugins.tracking.tables import accuracy_table, loss_table


def open_run(run_dir):
    return open_finished_run(run_dir, Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def run(micro_run):
    """The micro run reopened; tests that change it put it back."""
    return open_run(micro_run)


def batches_of(run, rows, batch_size=4, loss_on=None):
    return eval_batches(rows, pad_id=run.tokenizer.pad_id, loss_on=loss_on or run.recipe.data.loss_on,
                        domains=run.data.domains, batch_size=batch_size)


def losses_of(run, model, batches, experts=None, enabled=True):
    with evaluation_state(model, experts, enabled=enabled):
        return {d: x.loss for d, x in domain_losses(model, batches, run.data.domains).items()}


def test_eval_subset_takes_the_first_rows_of_each_domain_in_order(run):
    rows = eval_subset(run.data.eval, run.data.domains, 2)
    expected = []
    for domain in run.data.domains:
        expected += [r["prompt"] for r in run.data.eval if r["domain"] == domain][:2]
    assert rows["prompt"] == expected
    assert len(eval_subset(run.data.eval, run.data.domains, None)) == len(run.data.eval)


@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_domain_losses_equal_a_dense_cross_entropy_reference(run, loss_on):
    rows = eval_subset(run.data.eval, run.data.domains, 2)
    batches = batches_of(run, rows, batch_size=5, loss_on=loss_on)  # several batches, domains mixed
    assert len(batches) > 1
    got = losses_of(run, run.model, batches, run.experts)
    sums, counts = {}, {}
    with torch.no_grad():
        for batch in batches:
            logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:],
                                  ignore_index=IGNORE_INDEX, reduction="none")
            labelled = batch["labels"][:, 1:] != IGNORE_INDEX
            for row, domain_id in enumerate(batch["domain_ids"].tolist()):
                domain = run.data.domains[domain_id]
                sums[domain] = sums.get(domain, 0.0) + float(nll[row].sum())
                counts[domain] = counts.get(domain, 0) + int(labelled[row].sum())
    assert set(got) == set(run.data.domains)
    for domain in run.data.domains:
        assert got[domain] == pytest.approx(sums[domain] / counts[domain], rel=1e-5)


def test_eval_loss_is_the_training_lm_loss(run):
    from srde_core.train.losses import LossInputs
    from srde_plugins.losses import LMParams
    from srde_plugins.losses.lm import causal_lm

    rows = eval_subset(run.data.eval, run.data.domains, 2)
    (batch,) = batches_of(run, rows, batch_size=len(rows))
    with evaluation_state(run.model, run.experts):
        losses = domain_losses(run.model, [batch], run.data.domains)
        out = run.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = out.last_hidden_state
        train_loss = causal_lm(LMParams())(LossInputs(hidden=hidden, lm_head=run.model.get_output_embeddings(),
                                                      labels=batch["labels"], batch=batch))
    assert overall_loss(losses).loss == pytest.approx(float(train_loss), rel=1e-5)


def test_base_losses_are_those_of_the_bare_base_model_and_experts_change_them(run, micro_run):
    from safetensors.torch import load_file

    from srde_core.model.build import build_base_model

    bare = build_base_model(run)  # a fresh model of the recipe: no SRDE layers at all
    bare.load_state_dict(load_file(json.loads((micro_run / "base.json").read_text())["weights"]))
    batches = batches_of(run, eval_subset(run.data.eval, run.data.domains, 2))
    base = losses_of(run, run.model, batches, run.experts, enabled=False)
    reference = losses_of(run, bare, batches)
    srde = losses_of(run, run.model, batches, run.experts, enabled=True)
    for domain in run.data.domains:
        assert base[domain] == pytest.approx(reference[domain], rel=1e-6)
    assert max(abs(srde[d] - base[d]) for d in base) > 1e-4


def test_evaluation_restores_mode_and_expert_state(run):
    layers = list(run.experts.layers.values())
    run.model.train()
    layers[0].enabled = False  # a mixed state must come back as it was, not as "all on"
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with evaluation_state(run.model, run.experts, enabled=True):
                assert not run.model.training and all(m.enabled for m in layers)
                assert not torch.is_grad_enabled()
                raise RuntimeError("boom")
        assert run.model.training and [m.enabled for m in layers] == [False, True]
        result = evaluate(run, max_examples=1)
        assert all(m.training for m in run.model.modules())
        assert [m.enabled for m in layers] == [False, True]
        assert torch.is_grad_enabled()
        assert result["loss"]["all"]["srde"] != result["loss"]["all"]["base"]
    finally:
        run.model.eval()
        run.experts.set_enabled(True)


def test_accuracy_checks_each_continuation_with_the_domain_checker(run):
    rows = eval_subset(run.data.eval, run.data.domains, 3)
    seen = {}

    def fake_generate(model, prompts, **kwargs):
        seen.update(prompts=prompts, **kwargs)
        # Right answers for every other row (in the corpus's own form, text following), junk otherwise.
        return [run.tokenizer.encode(f" {r['answer']}\nQ: next" if i % 2 == 0 else " zzqx", bos=False, eos=False)
                for i, r in enumerate(rows)]

    result = answer_accuracy(run.model, rows, run.tokenizer, run.data.domains, max_new_tokens=7, batch_size=2,
                             generate=fake_generate)
    assert seen["prompts"] == [r["input_ids"][: r["prompt_len"]] for r in rows]
    assert seen["max_new_tokens"] == 7 and seen["eos_id"] == run.tokenizer.eos_id
    expected = {d: 0 for d in run.data.domains}
    for i, r in enumerate(rows):
        expected[r["domain"]] += int(i % 2 == 0)
    assert {d: a.correct for d, a in result.items()} == expected
    assert all(a.examples == 3 for a in result.values())


def test_user_domains_compare_the_first_line():
    assert is_correct("general", "New York", "  New   York\nQ: more")
    assert not is_correct("general", "New York", " New Jersey")
    assert not is_correct("general", "New York", " New York City")
    assert not is_correct("general", "", "anything")
    assert not is_correct("math", "42", " 042 and more")  # user data named like a corpus domain: first line


def test_a_generated_corpus_checks_its_own_answers():
    from srde_core.data.corpus import find_corpus

    reasoning, conventions = find_corpus("reasoning"), find_corpus("conventions")
    assert is_correct("math", "42", " 042 and more", reasoning)  # the reasoning domains' checkers: first word
    assert not is_correct("math", "42", " 43", reasoning)
    assert is_correct("general", "New York", " New   York\nQ:", reasoning)  # other domains: the first line
    assert is_correct("back", "3608", " 3608\nQ: ...", conventions)
    assert not is_correct("back", "3608", " 3608 and more", conventions)  # conventions: the first line


def test_left_padding_does_not_change_greedy_outputs(micro_run):
    run = open_run(micro_run)
    # The barely trained base says the same thing after every prompt; noise on its weight matrices
    # makes outputs differ per prompt, so the comparison can catch a padding leak.
    adapter = {id(p) for p in run.experts.adapter.parameters()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.model.parameters():
            if id(p) not in adapter and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    rows = eval_subset(run.data.eval, run.data.domains, 2)
    prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_len"])]
    assert len({len(p) for p in prompts}) > 1
    kwargs = dict(max_new_tokens=5, pad_id=run.tokenizer.pad_id, eos_id=run.tokenizer.eos_id)
    with evaluation_state(run.model, run.experts, enabled=True):
        batched = greedy_generate(run.model, prompts, batch_size=len(prompts), **kwargs)
        alone = [greedy_generate(run.model, [p], batch_size=1, **kwargs)[0] for p in prompts]
        # The plain greedy definition: argmax of a full forward, token by token.
        ids = torch.tensor([prompts[0]])
        for _ in range(5):
            ids = torch.cat([ids, run.model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert batched == alone
    assert len({tuple(x) for x in batched}) > 1
    reference = ids[0, len(prompts[0]):].tolist()
    eos = run.tokenizer.eos_id
    assert batched[0] == (reference[: reference.index(eos)] if eos in reference else reference)


def test_routing_counts_every_real_token_top_k_times(run):
    rows = eval_subset(run.data.eval, run.data.domains, 2)
    batches = batches_of(run, rows, batch_size=5)  # rows of different lengths: padding in every batch
    counter = RoutingCounter(run.experts.layers, len(run.data.domains))
    with evaluation_state(run.model, run.experts, enabled=True):
        domain_losses(run.model, batches, run.data.domains, experts=run.experts, after_forward=counter.observe)
    tokens = torch.zeros(len(run.data.domains), dtype=torch.long)
    for b in batches:
        tokens.index_add_(0, b["domain_ids"], b["attention_mask"].sum(dim=1))
    assert sum(int(b["attention_mask"].numel()) for b in batches) > int(tokens.sum())
    assert set(counter.counts) == set(run.experts.routers())
    for layer, router in run.experts.routers().items():
        counts = counter.counts[layer].cpu()
        assert counts.shape == (router.num_experts, len(run.data.domains))
        assert torch.equal(counts.sum(dim=0), tokens * router.top_k)
    assert int(counter.aggregate().sum()) == int(tokens.sum()) * sum(r.top_k for r in run.experts.routers().values())
    assert counter.stacked().shape[0] == sum(r.num_experts for r in run.experts.routers().values())


def test_answer_and_prompt_token_counts_split_the_real_tokens():
    from srde_core.model.routing import Routing

    # two rows of 4 tokens: row 0 (domain 0) answers at positions 2-3, row 1 (domain 1) at 3; its 4th is pad
    experts = torch.tensor([[0], [1], [1], [1], [0], [0], [0], [1]])
    routing = Routing(experts=experts, weights=torch.ones(8, 1), probs=torch.full((8, 2), 0.5),
                      logits=torch.zeros(8, 2), num_experts=2)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "domain_ids": torch.tensor([0, 1]),
             "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]])}
    answers, every = RoutingCounter([0], 2, tokens="answer"), RoutingCounter([0], 2)
    prompts = RoutingCounter([0], 2, tokens="prompt")
    for counter in (answers, every, prompts):
        counter.observe(batch, ForwardContext(routings={0: routing}))
    assert answers.counts[0].tolist() == [[0, 1], [2, 0]]  # expert 1 serves domain 0's answers only
    assert every.counts[0].tolist() == [[1, 3], [3, 0]]
    assert torch.equal(prompts.counts[0] + answers.counts[0], every.counts[0])
    assert purity(answers.counts[0]) == 1.0 and purity(every.counts[0]) == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="tokens"):
        RoutingCounter([0], 2, tokens="pad")


def test_purity_and_baseline_of_hand_made_matrices():
    m = torch.tensor([[8, 2, 0], [1, 1, 0], [0, 0, 0]])
    assert expert_purity(m) == [0.8, 0.5, None]
    assert purity(m) == pytest.approx(9 / 12)
    assert baseline_purity(m) == pytest.approx(9 / 12)
    specialised = torch.tensor([[6, 0], [0, 3]])
    assert purity(specialised) == 1.0 and baseline_purity(specialised) == pytest.approx(6 / 9)
    assert normalized_mutual_information(specialised) == pytest.approx(1.0)
    independent = torch.tensor([[2, 4], [1, 2]])  # every expert sees the overall domain mix
    assert purity(independent) == pytest.approx(baseline_purity(independent))
    assert normalized_mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(purity(torch.zeros(2, 2)))


def test_srde_eval_prints_the_tables_and_writes_eval_json(micro_run, capsys):
    assert main(["eval", str(micro_run)]) == 0
    out = capsys.readouterr().out
    for title in ("Eval loss per domain", "Answer accuracy per domain", "Expert × domain load",
                  "Routing purity per SRDE layer"):
        assert title in out
    assert "purity" in out and "baseline" in out
    saved = json.loads((micro_run / "eval.json").read_text())
    assert set(saved["loss"]["domains"]) == set(saved["domains"])


def test_srde_eval_json_is_parseable_and_complete(micro_run, capsys):
    assert main(["eval", str(micro_run), "--json", "--max-examples", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"loss", "accuracy", "routing", "domains", "examples_per_domain"} <= set(data)
    assert data["examples_per_domain"] == 2 and data["examples"] == 2 * len(data["domains"])
    for row in data["loss"]["domains"].values():
        assert row["delta"] == pytest.approx(row["srde"] - row["base"])
    assert all(row["examples"] == 2 for row in data["accuracy"]["domains"].values())
    layers = data["routing"]["layers"]
    assert layers and all({"counts", "purity", "baseline_purity", "nmi", "top_k"} <= set(s) for s in layers.values())
    answers = data["routing"]["answer_tokens"]
    assert set(answers["layers"]) == set(layers)
    for layer, s in answers["layers"].items():  # the labelled tokens: here (loss_on = "all") every real one
        assert s["slots"] == sum(map(sum, layers[layer]["counts"])) > 0
        assert 0.0 <= s["purity"] <= 1.0 and s["baseline_purity"] <= s["purity"] + 1e-12
    assert "answers" in main_output(["eval", str(micro_run), "--max-examples", "2"], capsys)


def main_output(argv, capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_srde_generate_prints_the_greedy_continuation(micro_run, capsys):
    prompt = "Q: What is 2 + 3?\nA:"
    assert main(["generate", str(micro_run), "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out == generate_from_run(micro_run, prompt, max_new_tokens=3) + "\n"
    assert isinstance(generate_from_run(micro_run, prompt, max_new_tokens=3, experts=False), str)


@pytest.mark.parametrize("command", [["eval"], ["generate", "--prompt", "x"]])
def test_a_directory_that_is_not_a_run_is_one_error_line(tmp_path, capsys, command):
    assert main([command[0], str(tmp_path), *command[1:]]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a run directory" in err


def test_loss_summary_prints_the_table_and_writes_eval_loss_json(run, micro_run):
    buffer = io.StringIO()
    console, run.console = run.console, Console(file=buffer, width=100)
    try:
        result = print_loss_summary(run)
    finally:
        run.console = console
    assert "Eval loss per domain" in buffer.getvalue()
    assert json.loads((micro_run / "eval_loss.json").read_text())["loss"] == result["loss"]
    assert set(result["loss"]["domains"]) == set(run.data.domains)
    no_eval = SimpleNamespace(data=SimpleNamespace(eval=None), log=lambda message: None)
    assert print_loss_summary(no_eval) is None


def test_a_run_without_experts_reports_the_base_alone(run):
    experts, run.experts = run.experts, None
    try:
        result = evaluate(run, max_examples=1)
    finally:
        run.experts = experts
    assert result["routing"] is None and not result["has_experts"]
    assert result["loss"]["all"]["base"] > 0 and result["loss"]["all"]["srde"] is None
    assert result["accuracy"]["all"]["srde"] is None
    buffer = io.StringIO()
    Console(file=buffer, width=100).print(loss_table(result), accuracy_table(result))
    assert "—" in buffer.getvalue()
