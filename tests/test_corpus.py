"""The generated six-domain corpus: determinism, balance, checkable answers, disjoint splits."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from srde_core.data import corpus
from srde_core.data.corpus import DOMAINS, build_corpus, check, generate, write_corpus
from srde_core.data.domains.planning import fewest_moves
from srde_core.data.tokenizer import load_tokenizer
from srde_core.data.params import TokenizerParams


def _wrong(answer: str) -> str:
    if answer.lstrip("-").isdigit():
        return str(int(answer) + 1)
    return {"True": "False", "False": "True", "yes": "no", "no": "unknown", "unknown": "yes"}.get(answer, answer + "X")


def test_same_seed_gives_identical_examples_and_other_seeds_differ():
    for domain in DOMAINS:
        assert generate(domain, 60, seed=3) == generate(domain, 60, seed=3)
        assert generate(domain, 60, seed=3) != generate(domain, 60, seed=4)
    assert generate("math", 9, seed=1, difficulty=2) == generate("math", 9, seed=1, difficulty=2)


def test_output_does_not_depend_on_the_process_hash_seed():
    code = "import json; from srde_core.data.corpus import build_corpus; print(json.dumps(build_corpus(20, 5, 7)))"
    outputs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0]) == [list(part) for part in build_corpus(20, 5, 7)]


def test_every_domain_has_every_difficulty_in_balance():
    for domain in DOMAINS:
        examples = generate(domain, 30, seed=0)
        assert Counter(e["difficulty"] for e in examples) == {1: 10, 2: 10, 3: 10}
        assert {e["domain"] for e in examples} == {domain}
        assert all(e["prompt"].startswith("Q: ") and e["prompt"].endswith("\nA:") for e in examples)
        assert all(e["answer"] and e["answer"] == e["answer"].strip() and " " not in e["answer"] for e in examples)
        assert all(generate(domain, 5, seed=0, difficulty=level)[i]["difficulty"] == level
                   for level in (1, 2, 3) for i in range(5))


def test_each_answer_passes_its_checker_and_a_wrong_one_fails():
    for domain in DOMAINS:
        for example in generate(domain, 90, seed=11):
            expected = example["answer"]
            for continuation in (f" {expected}", f" {expected}\nQ: 1+1=?", f"{expected}.", f" {expected.lower()}"):
                assert check(domain, expected, continuation), (domain, expected, continuation)
            assert not check(domain, expected, f" {_wrong(expected)}"), (domain, expected)
            assert not check(domain, expected, "")
            assert not check(domain, expected, f" maybe {expected}")


def test_checker_compares_integers_by_value_and_keeps_the_sign():
    assert check("math", "42", " 042")
    assert check("math", "-3", " -3\n")
    assert not check("math", "3", " -3")
    with pytest.raises(ValueError, match="unknown domain"):
        check("poetry", "x", "x")


def test_answers_agree_with_independent_oracles():
    for example in generate("code", 60, seed=5):
        source = example["prompt"].removeprefix("Q: ").removesuffix("\nA:")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(source, {})  # noqa: S102 - generated test programs
        assert out.getvalue().strip() == example["answer"], source
    for example in generate("logic", 60, seed=5):
        question = example["prompt"].removeprefix("Q: ").removesuffix("?\nA:")
        if example["difficulty"] < 3:
            assert str(bool(eval(question))) == example["answer"], question  # noqa: S307
    for example in generate("planning", 60, seed=5, difficulty=2):
        order = example["answer"]
        rules = example["prompt"].removeprefix("Q: ").split(". ")[0].split(", ")
        assert all(order.index(r[0]) < order.index(r[-1]) for r in rules)
    assert fewest_moves(3, 12, 3) == 2 and fewest_moves(1, 8, 1) == 3


def test_write_corpus_splits_are_disjoint_balanced_and_cached(tmp_path, monkeypatch):
    train_path, eval_path = write_corpus(tmp_path, examples_per_domain=60, eval_per_domain=12, seed=2)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    evals = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert Counter(e["domain"] for e in train) == {d: 60 for d in DOMAINS}
    assert Counter(e["domain"] for e in evals) == {d: 12 for d in DOMAINS}
    assert Counter((e["domain"], e["difficulty"]) for e in evals) == {(d, k): 4 for d in DOMAINS for k in (1, 2, 3)}
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in evals}
    assert len({e["prompt"] for e in evals}) == len(evals)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 2 and manifest["parameters"]["examples_per_domain"] == 60
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    before = train_path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("corpus regenerated although it is up to date")

    monkeypatch.setattr(corpus, "build_corpus", fail)
    assert write_corpus(tmp_path, 60, 12, 2) == (train_path, eval_path)
    assert train_path.stat().st_mtime_ns == before
    monkeypatch.undo()

    train_path.write_text("tampered\n")
    write_corpus(tmp_path, 60, 12, 2)
    assert [json.loads(line) for line in train_path.read_text().splitlines()] == train
    write_corpus(tmp_path, 30, 12, 2)
    assert len(train_path.read_text().splitlines()) == 30 * len(DOMAINS)


def test_a_small_space_that_cannot_fill_the_request_fails_clearly():
    with pytest.raises(ValueError, match="too few distinct prompts"):
        build_corpus(examples_per_domain=1, eval_per_domain=3000, seed=0)


def test_prompt_and_answer_fit_in_64_tokens():
    tokenizer = load_tokenizer(TokenizerParams())
    train, evals = build_corpus(examples_per_domain=150, eval_per_domain=30, seed=9)
    longest = {d: 0 for d in DOMAINS}
    for example in train + evals:
        n = len(tokenizer.encode(f"{example['prompt']} {example['answer']}", bos=True, eos=True))
        longest[example["domain"]] = max(longest[example["domain"]], n)
    assert all(n < 64 for n in longest.values()), longest
    answer_tokens = max(len(tokenizer.encode(e["answer"], bos=False, eos=False)) for e in train)
    assert answer_tokens <= 6
