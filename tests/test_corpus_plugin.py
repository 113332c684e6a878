"""A plugin adds a generated corpus (a `corpus` component): the run generates it, trains on it and
checks answers with its checker; an unknown corpus name is one line at validate."""

from __future__ import annotations

import json

import pytest

from srde_core.data.corpus import Corpus
from srde_core.testing import plugins_with

OVERRIDES = ['data.generate.corpus="parity"', "phases.base.steps=1", "phases.experts.steps=1"]


class Parity(Corpus):
    """``even`` / ``odd`` of small numbers, in two domains."""

    name, domains, version = "parity", ("even", "odd"), 3

    def __init__(self):
        self.checked = 0

    def splits(self, examples_per_domain, eval_per_domain, seed, validation_per_domain=0):
        def rows(domain, n, start):
            return [{"prompt": f"Q: {domain} {start + i}?\nA:", "answer": str((start + i) % 2 == (domain == "odd")),
                     "domain": domain, "difficulty": 1} for i in range(n)]

        return {"train": rows("even", examples_per_domain, 100) + rows("odd", examples_per_domain, 100),
                "eval": rows("even", eval_per_domain, seed) + rows("odd", eval_per_domain, seed), "validation": []}

    def check(self, domain, expected, generated):
        self.checked += 1
        return super().check(domain, expected, generated)


PARITY = Parity()


@pytest.fixture(scope="module")
def with_parity():
    return plugins_with("corpus", "parity", lambda params: PARITY, description="Parity of small numbers.")


def test_a_plugin_corpus_is_generated_trained_on_and_checks_the_answers(tmp_path, micro_recipe, with_parity):
    from conftest import run_recipe_in

    from srde_core.evaluate.report import evaluate

    run = run_recipe_in(tmp_path, micro_recipe, with_parity, OVERRIDES)
    assert run.data.corpus is PARITY and run.data.domains == ["even", "odd"]
    corpus_dir = tmp_path / ".cache" / "srde" / "corpus" / "parity-v3-seed0-n40-e6-v0"
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert manifest["parameters"]["corpus"] == "parity" and manifest["parameters"]["domains"] == ["even", "odd"]
    train = [json.loads(line) for line in (corpus_dir / "train.jsonl").read_text().splitlines()]
    assert len(train) == len(run.data.train) == 80 and {r["domain"] for r in train} == {"even", "odd"}
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "micro" / "metrics.jsonl").read_text().splitlines()]
    assert {m["phase"] for m in metrics} >= {"base", "experts"}
    before = PARITY.checked
    result = evaluate(run, max_examples=2)
    assert PARITY.checked - before == 2 * 2 * 2  # 2 examples x 2 domains, base and SRDE
    assert result["domains"] == ["even", "odd"]


def test_an_unknown_corpus_is_one_line_at_validate(micro_recipe, capsys):
    from srde_core.cli import main

    assert main(["validate", str(micro_recipe), "--set", 'data.generate.corpus="conventons"']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "data.generate.corpus" in err and "unknown corpus 'conventons'" in err and "did you mean 'conventions'" in err
