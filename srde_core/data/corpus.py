"""The generated six-domain reasoning corpus with program-checkable answers.

Every example is ``{"prompt": "Q: <question>\\nA:", "answer": "<value>", "domain": ..., "difficulty":
1..3}``; the text a model is trained on is ``prompt + " " + answer``. Generation is a pure function of
``(domain, n, seed, difficulty)``: each domain draws from its own ``random.Random`` seeded with a
string, which Python hashes the same way on every machine and run. ``check`` reads a model's
generated continuation and says whether it is the right answer, which is what accuracy evaluation and
correctness rewards use.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

from srde_core.data.domains import MODULES, conventions

DOMAINS: tuple[str, ...] = ("math", "code", "logic", "science", "planning", "patterns")

#: The generated corpora (``[data.generate] corpus``) and their domains: ``reasoning`` (the six
#: domains above, the tiny default) and ``conventions`` (one kind of digit-string prompt under seven
#: conventions; see :mod:`srde_core.data.domains.conventions`).
CORPORA: dict[str, tuple[str, ...]] = {"reasoning": DOMAINS, "conventions": conventions.DOMAINS}
DIFFICULTIES: tuple[int, ...] = (1, 2, 3)

# Bump a corpus's version when its generator changes its output: cached corpora key on it.
CORPUS_VERSIONS: dict[str, int] = {"reasoning": 1, "conventions": 2}

_MAX_MISSES = 20_000

TRAIN_FILE, EVAL_FILE, MANIFEST_FILE = "train.jsonl", "eval.jsonl", "manifest.json"
VALIDATION_FILE = "validation.jsonl"


def format_prompt(question: str) -> str:
    """The prompt template shared by every domain: ``"Q: <question>\\nA:"``."""
    return f"Q: {question}\nA:"


def _module(domain: str):
    module = MODULES.get(domain) or conventions.MODULES.get(domain)
    if module is None:
        known = ", ".join(d for domains in CORPORA.values() for d in domains)
        raise ValueError(f"unknown domain {domain!r} (domains: {known})")
    return module


def _stream(domain: str, tag: str, difficulty: int | None) -> Iterator[dict]:
    """Examples of one domain, endlessly; difficulties cycle 1, 2, 3 unless one is fixed."""
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, not {difficulty!r}")
    module = _module(domain)
    rng = random.Random(f"srde-corpus:{domain}:{tag}")
    i = 0
    while True:
        level = difficulty if difficulty is not None else DIFFICULTIES[i % len(DIFFICULTIES)]
        question, answer = module.make(rng, level)
        yield {"prompt": format_prompt(question), "answer": answer, "domain": domain, "difficulty": level}
        i += 1


def generate(domain: str, n: int, seed: int, difficulty: int | None = None) -> list[dict]:
    """``n`` examples of ``domain``, identical for identical arguments.

    With ``difficulty=None`` the difficulties cycle 1, 2, 3 (balanced); otherwise all are at that
    level. Small difficulty-1 spaces repeat: examples are not deduplicated here.
    """
    stream = _stream(domain, str(seed), difficulty)
    return [next(stream) for _ in range(n)]


def check(domain: str, expected: str, generated: str) -> bool:
    """Whether the generated continuation (e.g. ``" 42\\nQ: ..."``) answers ``expected``.

    The first word of ``generated`` is compared with the program-computed answer (integers by value,
    words case-insensitively).
    """
    return _module(domain).check(expected, generated)


def _draw(domain: str, n: int, tag: str, exclude: set[str], unique: bool) -> list[dict]:
    """``n`` examples of ``domain`` whose prompts are not in ``exclude``, difficulties balanced.

    The i-th accepted example has difficulty ``i % 3 + 1``, so excluding prompts never skews the mix.
    """
    streams = {level: _stream(domain, f"{tag}:{level}", level) for level in DIFFICULTIES}
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


def build_corpus(examples_per_domain: int, eval_per_domain: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The train and eval examples of :func:`write_corpus`, in memory (the reasoning corpus).

    Eval prompts are distinct and drawn first; train prompts never equal an eval prompt (train may
    repeat a prompt, as small difficulty-1 spaces must). Both lists are shuffled across domains.
    """
    splits = build_splits(examples_per_domain, eval_per_domain, seed)
    return splits["train"], splits["eval"]


def build_splits(examples_per_domain: int, eval_per_domain: int, seed: int, corpus: str = "reasoning",
                 validation_per_domain: int = 0) -> dict[str, list[dict]]:
    """``{"train", "eval", "validation"}`` rows of ``corpus``. Eval prompts are drawn first, then
    ``validation_per_domain`` validation prompts (distinct, none an eval prompt); train prompts are
    neither. Without validation rows the train and eval rows are those of :func:`build_corpus`."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r} (corpora: {', '.join(CORPORA)})")
    rows: dict[str, list[dict]] = {"train": [], "eval": [], "validation": []}
    for domain in CORPORA[corpus]:
        held_out = _draw(domain, eval_per_domain, f"{seed}:eval", set(), unique=True)
        excluded = {e["prompt"] for e in held_out}
        rows["eval"] += held_out
        if validation_per_domain:
            validation = _draw(domain, validation_per_domain, f"{seed}:validation", excluded, unique=True)
            excluded |= {e["prompt"] for e in validation}
            rows["validation"] += validation
        rows["train"] += _draw(domain, examples_per_domain, f"{seed}:train", excluded, False)
    random.Random(f"srde-corpus:shuffle:{seed}").shuffle(rows["train"])
    random.Random(f"srde-corpus:shuffle-eval:{seed}").shuffle(rows["eval"])
    random.Random(f"srde-corpus:shuffle-validation:{seed}").shuffle(rows["validation"])
    return rows


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_corpus(
    directory: str | os.PathLike, examples_per_domain: int, eval_per_domain: int, seed: int,
    corpus: str = "reasoning", validation_per_domain: int = 0,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (and, with ``validation_per_domain``,
    ``validation.jsonl``: held-out rows for choosing settings, disjoint from eval) of ``corpus``
    into ``directory``; return the train and eval paths.

    Each file is written to a temporary file and renamed into place, and ``manifest.json`` (the
    parameters and the files' hashes) last, so a crash never leaves a corpus that looks complete.
    When the manifest says the files were made with the same parameters and they are unchanged,
    nothing is written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = directory / TRAIN_FILE, directory / EVAL_FILE
    manifest_path = directory / MANIFEST_FILE
    wanted = {
        "version": CORPUS_VERSIONS.get(corpus, 0),
        "domains": list(CORPORA[corpus]) if corpus in CORPORA else [],
        "examples_per_domain": examples_per_domain,
        "eval_per_domain": eval_per_domain,
        "seed": seed,
    }
    files = {TRAIN_FILE: train_path, EVAL_FILE: eval_path}
    if corpus != "reasoning" or validation_per_domain:  # the reasoning corpus's manifests stay as they were
        wanted |= {"corpus": corpus, "validation_per_domain": validation_per_domain}
    if validation_per_domain:
        files[VALIDATION_FILE] = directory / VALIDATION_FILE
    if manifest_path.exists() and all(path.exists() for path in files.values()):
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("parameters") == wanted and manifest.get("sha256") == {
            name: _sha256(path) for name, path in files.items()
        }:
            return train_path, eval_path

    splits = build_splits(examples_per_domain, eval_per_domain, seed, corpus, validation_per_domain)
    split_of = {TRAIN_FILE: "train", EVAL_FILE: "eval", VALIDATION_FILE: "validation"}
    for name, path in files.items():
        _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits[split_of[name]]))
    manifest = {"parameters": wanted, "sha256": {name: _sha256(path) for name, path in files.items()}}
    _atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return train_path, eval_path
