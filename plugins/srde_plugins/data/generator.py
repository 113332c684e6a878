"""Drawing a generated corpus from its domains' generators, with balanced difficulties.

A domain is a module (or object) with ``NAME``, ``make(rng, difficulty) -> (question, answer)`` and
``check(expected, generated) -> bool``. Generation is a pure function of ``(domain, n, seed,
difficulty)``: each domain draws from its own ``random.Random`` seeded with a string, which Python
hashes the same way on every machine and run. Every row is ``{"prompt": "Q: <question>\\nA:",
"answer": "<value>", "domain": ..., "difficulty": 1..3}``; the text a model is trained on is
``prompt + " " + answer``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

from srde_core.data.corpus import Corpus

DIFFICULTIES: tuple[int, ...] = (1, 2, 3)

_MAX_MISSES = 20_000


def format_prompt(question: str) -> str:
    """The prompt template shared by every domain: ``"Q: <question>\\nA:"``."""
    return f"Q: {question}\nA:"


def stream(domain: str, module: Any, tag: str, difficulty: int | None) -> Iterator[dict]:
    """Examples of one domain, endlessly; difficulties cycle 1, 2, 3 unless one is fixed."""
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, not {difficulty!r}")
    rng = random.Random(f"srde-corpus:{domain}:{tag}")
    i = 0
    while True:
        level = difficulty if difficulty is not None else DIFFICULTIES[i % len(DIFFICULTIES)]
        question, answer = module.make(rng, level)
        yield {"prompt": format_prompt(question), "answer": answer, "domain": domain, "difficulty": level}
        i += 1


def draw(domain: str, module: Any, n: int, tag: str, exclude: set[str], unique: bool) -> list[dict]:
    """``n`` examples of ``domain`` whose prompts are not in ``exclude``, difficulties balanced.

    The i-th accepted example has difficulty ``i % 3 + 1``, so excluding prompts never skews the mix.
    """
    streams = {level: stream(domain, module, f"{tag}:{level}", level) for level in DIFFICULTIES}
    seen: set[str] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        level = DIFFICULTIES[len(out) % len(DIFFICULTIES)]
        example = next(streams[level])
        if example["prompt"] in exclude or (unique and example["prompt"] in seen):
            # Thousands of misses in a row mean the space of new prompts is (nearly) used up.
            misses += 1
            if misses > _MAX_MISSES:
                raise ValueError(f"{domain}: cannot draw {n} examples: too few distinct prompts at difficulty {level}")
            continue
        misses = 0
        seen.add(example["prompt"])
        out.append(example)
    return out


class GeneratedCorpus(Corpus):
    """A corpus drawn domain by domain from ``modules`` (domain name -> generator module)."""

    def __init__(self, name: str, modules: Mapping[str, Any], version: int, *, named_cache: bool = True):
        self.name, self.modules, self.version, self.named_cache = name, dict(modules), version, named_cache
        self.domains = tuple(self.modules)

    def splits(self, examples_per_domain: int, eval_per_domain: int, seed: int,
               validation_per_domain: int = 0) -> dict[str, list[dict]]:
        """Eval prompts are drawn first, then ``validation_per_domain`` validation prompts (distinct,
        none an eval prompt); train prompts are neither (train may repeat a prompt, as small
        difficulty-1 spaces must). Each split is shuffled across domains."""
        rows: dict[str, list[dict]] = {"train": [], "eval": [], "validation": []}
        for domain, module in self.modules.items():
            held_out = draw(domain, module, eval_per_domain, f"{seed}:eval", set(), unique=True)
            excluded = {e["prompt"] for e in held_out}
            rows["eval"] += held_out
            if validation_per_domain:
                validation = draw(domain, module, validation_per_domain, f"{seed}:validation", excluded, unique=True)
                excluded |= {e["prompt"] for e in validation}
                rows["validation"] += validation
            rows["train"] += draw(domain, module, examples_per_domain, f"{seed}:train", excluded, False)
        random.Random(f"srde-corpus:shuffle:{seed}").shuffle(rows["train"])
        random.Random(f"srde-corpus:shuffle-eval:{seed}").shuffle(rows["eval"])
        random.Random(f"srde-corpus:shuffle-validation:{seed}").shuffle(rows["validation"])
        return rows

    def check(self, domain: str, expected: str, generated: str) -> bool:
        """The domain's own checker for this corpus's domains; the first line otherwise."""
        module = self.modules.get(domain)
        return module.check(expected, generated) if module is not None else super().check(domain, expected, generated)
