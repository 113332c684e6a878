"""The conventions corpus and preset: one kind of prompt under seven conventions, a validation split
disjoint from eval, and a base pre-trained on the general domain only (the shuffled sampler's
``domains``)."""

from __future__ import annotations

import random
import subprocess
import sys
import types

import pytest

from srde_core.data.corpus import CORPORA, build_corpus, build_splits, write_corpus
from srde_core.data.domains.conventions import DOMAINS, MODULES, RULES


def test_every_convention_gives_its_answer_on_hand_computed_cases():
    cases = {  # (a, op, b) -> answer per domain
        (17, "+", 5): {"general": "22", "swap": "12", "order": "22", "offset": "23", "mod": "2", "reverse": "22", "cipher": "55"},
        (13, "-", 6): {"general": "7", "swap": "19", "order": "-7", "offset": "8", "mod": "7", "reverse": "7", "cipher": "0"},
        (4, "*", 5): {"general": "20", "swap": "20", "order": "20", "offset": "21", "mod": "0", "reverse": "02", "cipher": "53"},
    }
    for (a, op, b), answers in cases.items():
        assert {d: RULES[d](a, op, b) for d in DOMAINS} == answers


def test_prompts_share_one_form_and_the_tag_names_the_domain():
    for domain in DOMAINS:
        rng = random.Random(0)
        for level in (1, 2, 3):
            question, answer = MODULES[domain].make(rng, level)
            if domain == "general":
                assert not question.startswith("[")
            else:
                assert question.startswith(f"[{domain}] ")
            assert question.endswith("=?") and answer
    # the same draw under two domains: the same expression, another answer
    swap = MODULES["swap"].make(random.Random(5), 2)
    offset = MODULES["offset"].make(random.Random(5), 2)
    assert swap[0].split("] ")[1] == offset[0].split("] ")[1] and swap[1] != offset[1]


def test_checker_reads_the_first_word_exactly():
    check = MODULES["reverse"].check
    assert check("02", " 02\nQ: ...") and not check("02", " 2") and not check("02", "")
    assert MODULES["order"].check("-7", " -7.")


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
