"""The built-in generated corpora: ``reasoning`` (six domains with program-checkable answers, the
tiny default) and ``conventions`` (one kind of digit-string prompt under seven conventions; see
:mod:`srde_plugins.data.domains.conventions`).

``generate`` and ``check`` work on the domain of either corpus; ``build_splits`` / ``build_corpus``
give a corpus's rows in memory, as :func:`srde_core.data.corpus.write_corpus` writes them.
"""

from __future__ import annotations

from srde_core.data.corpus import Corpus, first_line_matches
from srde_plugins.data.domains import MODULES, conventions
from srde_plugins.data.generator import DIFFICULTIES, GeneratedCorpus, format_prompt, stream

__all__ = ["CORPORA", "DIFFICULTIES", "DOMAINS", "build_corpus", "build_splits", "check", "format_prompt", "generate"]


class ConventionsCorpus(GeneratedCorpus):
    def check(self, domain: str, expected: str, generated: str) -> bool:
        """The first line of the continuation, whitespace-normalised, equals the answer (how
        accuracy has always been read on this corpus; each domain's own ``check`` reads the first
        word exactly)."""
        return first_line_matches(expected, generated)


# Bump a corpus's version when its generator changes its output: cached corpora key on it.
REASONING = GeneratedCorpus("reasoning", {m.NAME: m for m in MODULES.values()}, 1, named_cache=False)
CONVENTIONS = ConventionsCorpus("conventions", conventions.MODULES, 2)

DOMAINS: tuple[str, ...] = REASONING.domains
CORPORA: dict[str, tuple[str, ...]] = {c.name: c.domains for c in (REASONING, CONVENTIONS)}
_BUILT_IN = {c.name: c for c in (REASONING, CONVENTIONS)}


def reasoning(params=None) -> Corpus:
    """The six-domain reasoning corpus (math, code, logic, science, planning, patterns)."""
    return REASONING


def conventions_corpus(params=None) -> Corpus:
    """One digit-string prompt under seven conventions (a general domain and six tagged ones)."""
    return CONVENTIONS


def _module(domain: str):
    module = REASONING.modules.get(domain) or CONVENTIONS.modules.get(domain)
    if module is None:
        known = ", ".join(d for domains in CORPORA.values() for d in domains)
        raise ValueError(f"unknown domain {domain!r} (domains: {known})")
    return module


def generate(domain: str, n: int, seed: int, difficulty: int | None = None) -> list[dict]:
    """``n`` examples of ``domain``, identical for identical arguments.

    With ``difficulty=None`` the difficulties cycle 1, 2, 3 (balanced); otherwise all are at that
    level. Small difficulty-1 spaces repeat: examples are not deduplicated here.
    """
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, not {difficulty!r}")
    rows = stream(domain, _module(domain), str(seed), difficulty)
    return [next(rows) for _ in range(n)]


def check(domain: str, expected: str, generated: str) -> bool:
    """Whether the generated continuation (e.g. ``" 42\\nQ: ..."``) answers ``expected``, by the
    domain's own checker (the first word; integers by value, words case-insensitively)."""
    return _module(domain).check(expected, generated)


def build_splits(examples_per_domain: int, eval_per_domain: int, seed: int, corpus: str = "reasoning",
                 validation_per_domain: int = 0) -> dict[str, list[dict]]:
    """``{"train", "eval", "validation"}`` rows of the built-in ``corpus``."""
    if corpus not in _BUILT_IN:
        raise ValueError(f"unknown corpus {corpus!r} (corpora: {', '.join(CORPORA)})")
    return _BUILT_IN[corpus].splits(examples_per_domain, eval_per_domain, seed, validation_per_domain)


def build_corpus(examples_per_domain: int, eval_per_domain: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The train and eval rows of the reasoning corpus, as written to its files."""
    splits = build_splits(examples_per_domain, eval_per_domain, seed)
    return splits["train"], splits["eval"]
