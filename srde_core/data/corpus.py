"""Generated corpora (``[data.generate]``): the ``corpus`` contract, and writing a corpus's files.

A corpus is a component of kind ``corpus`` (the built-ins, ``reasoning`` and ``conventions``, live in
the ``data`` plugin). It gives the rows of its splits, each row ``{"prompt", "answer", "domain",
"difficulty"}``, as a pure function of its arguments, and reads a model's continuation as an answer
(:meth:`Corpus.check`, what accuracy evaluation and correctness rewards use). The core writes the
rows to JSON Lines files with a manifest and keeps them as a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

TRAIN_FILE, EVAL_FILE, MANIFEST_FILE = "train.jsonl", "eval.jsonl", "manifest.json"
VALIDATION_FILE = "validation.jsonl"


def first_line(text: str) -> str:
    """The first line of ``text``, whitespace-normalised (how answers of user data are compared)."""
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def first_line_matches(expected: str, generated: str) -> bool:
    """The first lines of both, whitespace-normalised, are equal (and not empty)."""
    want = first_line(expected)
    return bool(want) and first_line(generated) == want


class Corpus(ABC):
    """A generated corpus: its name, domains and version, its rows, and its answer checker."""

    #: the registered name (``[data.generate] corpus``)
    name: str = ""
    #: the domains, in generation order
    domains: tuple[str, ...] = ()
    #: bumped when the generator's output changes: cached corpora key on it
    version: int = 0
    #: whether the cache directory and manifest name the corpus (False only for the default
    #: ``reasoning`` corpus, whose cached files keep their first names)
    named_cache: bool = True

    @abstractmethod
    def splits(self, examples_per_domain: int, eval_per_domain: int, seed: int,
               validation_per_domain: int = 0) -> dict[str, list[dict]]:
        """``{"train", "eval", "validation"}`` rows, identical for identical arguments (the
        validation rows empty without ``validation_per_domain``)."""

    def check(self, domain: str, expected: str, generated: str) -> bool:
        """Whether the continuation ``generated`` answers ``expected``. By default the first line
        of each, whitespace-normalised, must be equal (and not empty)."""
        return first_line_matches(expected, generated)


def find_corpus(name: str | Corpus, plugins: Any = None) -> Corpus:
    """The corpus registered as ``name`` (the built-ins and every installed plugin's), built."""
    if isinstance(name, Corpus):
        return name
    from srde_core.plugins import load_plugins
    from srde_core.recipe.resolve import resolve_component

    return resolve_component(plugins if plugins is not None else load_plugins(), "corpus", name).build()


def cache_name(corpus: Corpus, examples_per_domain: int, eval_per_domain: int, seed: int,
               validation_per_domain: int = 0) -> str:
    """The directory name of a generated corpus under ``cache_dir/corpus``."""
    name = f"v{corpus.version}-seed{seed}-n{examples_per_domain}-e{eval_per_domain}"
    if corpus.named_cache or validation_per_domain:
        name = f"{corpus.name}-{name}-v{validation_per_domain}"
    return name


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
    corpus: str | Corpus = "reasoning", validation_per_domain: int = 0, plugins: Any = None,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (and, with ``validation_per_domain``,
    ``validation.jsonl``: held-out rows for choosing settings, disjoint from eval) of ``corpus`` (a
    name, resolved through the plugins' ``corpus`` registry, or a :class:`Corpus`) into
    ``directory``; return the train and eval paths.

    Each file is written to a temporary file and renamed into place, and ``manifest.json`` (the
    parameters and the files' hashes) last, so a crash never leaves a corpus that looks complete.
    When the manifest says the files were made with the same parameters and they are unchanged,
    nothing is written.
    """
    corpus = find_corpus(corpus, plugins)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = directory / TRAIN_FILE, directory / EVAL_FILE
    manifest_path = directory / MANIFEST_FILE
    wanted = {
        "version": corpus.version,
        "domains": list(corpus.domains),
        "examples_per_domain": examples_per_domain,
        "eval_per_domain": eval_per_domain,
        "seed": seed,
    }
    files = {TRAIN_FILE: train_path, EVAL_FILE: eval_path}
    if corpus.named_cache or validation_per_domain:  # the default corpus's manifests stay as they were
        wanted |= {"corpus": corpus.name, "validation_per_domain": validation_per_domain}
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

    splits = corpus.splits(examples_per_domain, eval_per_domain, seed, validation_per_domain)
    split_of = {TRAIN_FILE: "train", EVAL_FILE: "eval", VALIDATION_FILE: "validation"}
    for name, path in files.items():
        _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits[split_of[name]]))
    manifest = {"parameters": wanted, "sha256": {name: _sha256(path) for name, path in files.items()}}
    _atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return train_path, eval_path
