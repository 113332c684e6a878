"""lm-evaluation-harness integration (`srde lm-eval`, model type `srde`): the local tasks over the
run's eval rows score a run with experts on and off, and the scores differ."""

from __future__ import annotations

import json
import os

import pytest

from srde_core.cli import main


@pytest.fixture(scope="module")
def scores(micro_run):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results = {}
    for flag in ([], ["--no-experts"]):
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["lm-eval", str(micro_run), "--tasks", "srde_corpus_ll,srde_corpus_gen", "--limit", "6", "--json", *flag]) == 0
        data = json.loads(out.getvalue())
        results[data["experts"]] = data["results"]
    return results


def test_both_local_tasks_score_every_requested_example(scores):
    for results in scores.values():
        assert results["srde_corpus_ll"]["sample_len"] == 6 and results["srde_corpus_gen"]["sample_len"] == 6
        assert 0.0 <= results["srde_corpus_gen"]["exact_match,strip"] <= 1.0


def test_experts_on_and_off_give_different_loglikelihoods(scores):
    on, off = scores[True]["srde_corpus_ll"]["perplexity,none"], scores[False]["srde_corpus_ll"]["perplexity,none"]
    assert on > 0 and off > 0 and on != off


def test_the_loglikelihood_is_the_models_own(micro_run):
    import torch

    from srde_plugins.tracking.harness import SRDELM

    lm = SRDELM(str(micro_run), experts=True)
    context, continuation = lm.tok_encode("Q: 1 + 1?\nA:"), lm.tok_encode(" 2", add_special_tokens=False)
    ((score, _),) = lm._loglikelihood_tokens([(("", ""), context, continuation)])
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[0, len(context) - 1:-1], -1)
    expected = float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
    assert score == pytest.approx(expected, rel=1e-5)


def test_an_unknown_task_is_one_line(micro_run, capsys):
    assert main(["lm-eval", str(micro_run), "--tasks", "srde_corpus_typo", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown lm-eval task(s) srde_corpus_typo" in err[0]


def test_lm_eval_is_the_tracking_plugins_command(capsys):
    from srde_core.cli import build_parser
    from srde_core.plugins import load_plugins

    def commands(plugins):
        return list(build_parser(plugins)._subparsers._group_actions[0].choices)

    assert commands(load_plugins()) == ["run", "validate", "show", "plan", "list-plugins", "eval", "lm-eval", "generate"]
    assert "lm-eval" not in commands(load_plugins(entry_points=[]))  # the core alone has no lm-eval
    assert main(["lm-eval", "--help"]) == 0 and "--include-path INCLUDE_PATH" in capsys.readouterr().out
