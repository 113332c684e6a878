"""The conventions corpus and preset: one kind of prompt under seven conventions, a validation split
disjoint from eval, and a base pre-trained on the general domain only (the shuffled sampler's
``domains``)."""

from __future__ import annotations

import random
import subprocess
import sys
import types

import pytest

from srde_core.data.corpus import write_corpus
from srde_plugins.data.corpora import CORPORA, build_corpus, build_splits
from srde_plugins.data.domains.conventions import DOMAINS, GENERAL_RULES, MODULES, RULES


def test_every_convention_gives_its_answer_on_hand_computed_cases():
    cases = {
        "4719": {"back": "3608", "turn": "9264", "double": "8428", "triple": "2137", "square": "6911",
                 "cipher": "5684"},
        "050": {"back": "949", "turn": "505", "double": "000", "triple": "050", "square": "050", "cipher": "393"},
    }
    for digits, answers in cases.items():
        assert {d: RULES[d](digits) for d in RULES} == answers
    assert {t: rule("4719") for t, rule in GENERAL_RULES.items()} == {"copy": "4719", "next": "5820", "flip": "5280"}


def test_prompts_share_one_form_and_the_tag_names_the_domain():
    seen_general_tags = set()
    for domain in DOMAINS:
        rng = random.Random(0)
        for _ in range(10):
            for level, length in ((1, 3), (2, 4), (3, 5)):
                question, answer = MODULES[domain].make(rng, level)
                tag, digits = question.split(" ")
                assert tag.startswith("[") and tag.endswith("]")
                if domain == "general":
                    seen_general_tags.add(tag[1:-1])
                    assert answer == GENERAL_RULES[tag[1:-1]](digits)
                else:
                    assert tag == f"[{domain}]" and answer == RULES[domain](digits)
                assert digits.isdigit() and len(digits) == length and len(answer) == length
    assert seen_general_tags == set(GENERAL_RULES) and not set(GENERAL_RULES) & set(DOMAINS)
    # the same draw under two domains: the same digits, another answer
    double = MODULES["double"].make(random.Random(5), 2)
    cipher = MODULES["cipher"].make(random.Random(5), 2)
    assert double[0].split("] ")[1] == cipher[0].split("] ")[1] and double[1] != cipher[1]


def test_checker_reads_the_first_word_exactly():
    check = MODULES["double"].check
    assert check("024", " 024\nQ: ...") and not check("024", " 24") and not check("024", "")
    assert MODULES["back"].check("949", " 949.")


def test_splits_are_disjoint_balanced_and_the_reasoning_corpus_is_unchanged():
    splits = build_splits(60, 10, 0, "conventions", validation_per_domain=10)
    prompts = {name: {r["prompt"] for r in rows} for name, rows in splits.items()}
    assert not prompts["eval"] & prompts["validation"]
    assert not prompts["train"] & (prompts["eval"] | prompts["validation"])
    for name, n in (("train", 60), ("eval", 10), ("validation", 10)):
        counts = {d: sum(r["domain"] == d for r in splits[name]) for d in DOMAINS}
        assert counts == {d: n for d in DOMAINS}
    assert build_splits(60, 10, 0, "conventions", validation_per_domain=10) == splits  # deterministic
    # no validation rows: the reasoning corpus is what it always was
    reasoning = build_splits(20, 5, 3)
    assert (reasoning["train"], reasoning["eval"]) == build_corpus(20, 5, 3) and not reasoning["validation"]
    assert set(CORPORA) == {"reasoning", "conventions"}


def test_write_corpus_writes_the_validation_file(tmp_path):
    train, evals = write_corpus(tmp_path, 30, 5, 0, "conventions", validation_per_domain=5)
    validation = tmp_path / "validation.jsonl"
    assert train.is_file() and evals.is_file() and validation.is_file()
    assert len(validation.read_text().splitlines()) == 5 * len(DOMAINS)
    before = validation.stat().st_mtime_ns
    write_corpus(tmp_path, 30, 5, 0, "conventions", validation_per_domain=5)  # same parameters: untouched
    assert validation.stat().st_mtime_ns == before


def test_held_out_validation_needs_validation_rows(tmp_path):
    done = subprocess.run([sys.executable, "-m", "srde_core.cli", "validate", "srde:conventions",
                           "--set", "data.generate.validation_per_domain=0",
                           "--set", 'data.generate.held_out="validation"'], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "data.generate" in done.stderr and "Traceback" not in done.stderr
    ok = subprocess.run([sys.executable, "-m", "srde_core.cli", "validate", "srde:conventions",
                         "--set", 'data.generate.held_out="validation"'], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_the_shuffled_sampler_draws_only_the_chosen_domains():
    from datasets import Dataset

    from srde_core.errors import DataError
    from srde_plugins.data import ShuffledParams
    from srde_plugins.data.shuffled import ShuffledSampler

    domains = ["general", "swap", "general", "mod", "general", "swap", "general"]
    dataset = Dataset.from_dict({"domain": domains, "x": list(range(len(domains)))})
    phase = types.SimpleNamespace(name="base", index=0)
    sampler = ShuffledSampler(ShuffledParams(domains=["general"]))
    drawn = [i for step in range(6) for i in sampler.indices(dataset, phase, step, 2, seed=0)]
    assert {domains[i] for i in drawn} == {"general"}
    assert sorted(drawn[:4]) == [0, 2, 4, 6] and sorted(drawn[4:8]) == [0, 2, 4, 6]  # every epoch once each
    everything = ShuffledSampler(ShuffledParams())
    assert sorted(everything.indices(dataset, phase, 0, 7, seed=0)) == list(range(7))
    with pytest.raises(DataError, match="phases\\[0\\].sampler.domains"):
        ShuffledSampler(ShuffledParams(domains=["nope"])).indices(dataset, phase, 0, 2, seed=0)


def test_the_preset_pretrains_its_base_on_the_general_domain_only():
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe

    recipe = load_recipe("srde:conventions", load_plugins())
    resolved = recipe.resolved
    assert resolved["data"]["generate"]["corpus"] == "conventions"
    base, experts = resolved["phases"]
    assert base["trainer"]["name"] == "base_pretrain" and base["sampler"]["domains"] == ["general"]
    assert experts["trainer"]["name"] == "joint" and not experts["sampler"].get("domains")
