"""Loading a recipe's ``[data]``: sources -> one tokenisation pass -> a cached ``DataBundle``.

Every source (the generated corpus, JSON Lines / Parquet / CSV files, an HF dataset) goes through
``datasets`` and is tokenised once by ``Dataset.map``. The result is saved under
``cache_dir/tokenized/<key>``, where the key covers the sources' contents (or the HF dataset's
fingerprint), the tokenizer's fingerprint, ``seq_len`` and the column mapping; the directory is
written under a temporary name and renamed into place, so it is either complete or absent. A second
``load_data`` with the same inputs reads it back without tokenising.

Each tokenised row holds ``input_ids`` (BOS + prompt + answer + EOS, truncated to ``seq_len``),
``prompt_len`` (tokens of BOS + prompt), ``domain``, ``domain_id``, ``difficulty``, and the raw
``prompt`` / ``answer`` strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from srde_core.data.collate import collate  # noqa: F401 - re-exported: trainers import it from here
from srde_core.data.corpus import VALIDATION_FILE, Corpus, cache_name, find_corpus, write_corpus
from srde_core.data.params import ColumnsParams, DataParams
from srde_core.data.sources import ColumnMap, Source, find_format, value_problem
from srde_core.data.tokenizer import Tokenizer
from srde_core.errors import DataError

# Bump when the tokenised layout or the prompt/answer joining rule changes.
CACHE_VERSION = 1
DEFAULT_DOMAIN = "general"
_META = "meta.json"


@dataclass
class DataBundle:
    """Tokenised train/eval data and what is needed to use it.

    ``train`` / ``eval`` are ``datasets.Dataset`` objects (``eval`` is ``None`` when the recipe has
    no eval data). ``domains`` is the sorted list of domain names; a row's ``domain_id`` indexes it.
    For generation-based evaluation, feed ``input_ids[:prompt_len]`` (exactly the tokens the model
    saw before the answer in training) and check the continuation against ``answer``.
    ``fingerprint`` identifies the tokenised data (sources, tokenizer, ``seq_len``, columns): equal
    fingerprints mean identical data, so downstream caches may key on it.
    """

    train: object
    eval: object | None
    domains: list[str]
    tokenizer: Tokenizer
    fingerprint: str = ""
    cache_hit: bool = False
    cache_path: Path | None = None
    #: why the cached tokenisation under this key could not be read (it was tokenised again)
    cache_damaged: str | None = None
    #: the generated corpus the data came from (its answer checker reads the model's answers)
    corpus: Corpus | None = None

    def check_answer(self, domain: str, expected: str, generated: str) -> bool:
        """Whether the continuation ``generated`` answers ``expected``: the corpus's checker, or
        for other data the first line, whitespace-normalised (see :meth:`Corpus.check`)."""
        from srde_core.evaluate.accuracy import is_correct

        return is_correct(domain, expected, generated, self.corpus)


@dataclass(frozen=True)
class LabelStats:
    """What truncation to ``seq_len`` left of a tokenised split's answers (see :func:`label_stats`)."""

    examples: int
    labelled: int  # examples with at least one next-token target under the recipe's loss_on
    answer_cut: int  # examples whose answer lost tokens (or its EOS) to truncation
    answer_lost: int  # examples with no answer token left at all


def label_stats(dataset, loss_on: str, eos_id: int) -> LabelStats:
    """Count, over a tokenised split, the examples with something to learn and the answers that
    truncation cut, from the Arrow columns (no Python loop over rows).

    A row was truncated when its last token is not EOS (every example is encoded with one); its
    answer tokens are those from ``prompt_len`` on. The collated labels are unshifted, so a row has
    a next-token target when a labelled position other than the first exists: with ``loss_on =
    "answer"`` a position ``>= max(prompt_len, 1)``, with ``"all"`` any position ``>= 1``.
    """
    import numpy as np

    if len(dataset) == 0:
        return LabelStats(0, 0, 0, 0)
    table = dataset.select_columns(["input_ids", "prompt_len"]).with_format("arrow")[:]  # a selection's rows too
    ids = table.column("input_ids").combine_chunks()
    n = len(ids)
    lengths = np.diff(np.asarray(ids.offsets, dtype=np.int64))
    values = np.asarray(ids.flatten())
    ends = np.clip(np.cumsum(lengths) - 1, 0, None)
    last = np.where(lengths > 0, values[ends], -1) if len(values) else np.full(n, -1)
    prompt_len = np.asarray(table.column("prompt_len").to_numpy(zero_copy_only=False), dtype=np.int64)
    first_label = np.maximum(prompt_len, 1) if loss_on == "answer" else np.ones_like(prompt_len)
    truncated = last != eos_id
    lost = prompt_len >= lengths
    return LabelStats(
        examples=n,
        labelled=int((lengths > first_label).sum()),
        answer_cut=int((truncated | lost).sum()),
        answer_lost=int(lost.sum()),
    )


def join_prompt_answer(prompt: str, answer: str) -> str:
    """The training text: ``prompt + " " + answer``, without the space when either side is empty
    or already has whitespace at the join."""
    if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


def encode_example(tokenizer: Tokenizer, prompt: str, answer: str, seq_len: int) -> tuple[list[int], int]:
    """``(input_ids, prompt_len)`` of one example.

    The whole text is encoded at once (so the ids are what the tokenizer gives for the text), and
    ``prompt_len`` is the length of the prefix shared with the encoded prompt: the answer always
    starts at a token boundary, even where a tokenizer would merge across the join.
    """
    ids = tokenizer.encode(join_prompt_answer(prompt, answer), bos=True, eos=True)
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False) if prompt else ids[: int(tokenizer.bos_id is not None)]
    shared = 0
    for a, b in zip(ids, prompt_ids):
        if a != b:
            break
        shared += 1
    return ids[:seq_len], min(shared, seq_len)


def _sources(params: DataParams, cache_dir: Path, base_dir: Path, corpus: Corpus | None,
             plugins=None) -> tuple[list[Source], list[Source], ColumnsParams]:
    hf_cache = cache_dir / "hf"
    if params.generate is not None:
        if params.train_files or params.eval_files or params.hf_name:
            raise DataError("cannot be combined with train_files, eval_files or hf_name", key="data.generate")
        g = params.generate
        corpus_dir = cache_dir / "corpus" / cache_name(corpus, g.examples_per_domain, g.eval_per_domain, g.seed,
                                                       g.validation_per_domain)
        train_path, eval_path = write_corpus(corpus_dir, g.examples_per_domain, g.eval_per_domain, g.seed,
                                             corpus, g.validation_per_domain)
        if g.held_out == "validation":
            eval_path = corpus_dir / VALIDATION_FILE
        # The corpus has its own fixed columns; a [data.columns] table describes user data only.
        json_format = find_format("json", plugins)
        return ([json_format.open(train_path, hf_cache, "data.generate")],
                [json_format.open(eval_path, hf_cache, "data.generate")], ColumnsParams())
    train, evals = find_format(params.format, plugins).sources(params, base_dir, hf_cache)
    return train, evals, params.columns


def _cache_key(train: list[Source], evals: list[Source], columns: ColumnsParams, tokenizer: Tokenizer, seq_len: int) -> str:
    material = {
        "version": CACHE_VERSION,
        "train": [s.identity for s in train],
        "eval": [s.identity for s in evals],
        "columns": columns.model_dump(),
        # Defaults and explicit settings resolve differently (optional vs required columns).
        "explicit": sorted(columns.model_fields_set),
        "tokenizer": tokenizer.fingerprint,
        "seq_len": seq_len,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _features():
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "prompt_len": Value("int32"),
            "domain": Value("string"),
            "domain_id": Value("int32"),
            "difficulty": Value("int32"),
            "prompt": Value("string"),
            "answer": Value("string"),
        }
    )


def _field(batch: dict, j: int, cmap: ColumnMap, role: str, name: str, row: int):
    column = getattr(cmap, role)
    value = batch[column][j]
    problem = value_problem(role, value)
    if problem:
        raise DataError(f"column '{column}' {problem}", source=name, key=f"row {row}")
    return value


def _tokenise(raw, cmap: ColumnMap, name: str, tokenizer: Tokenizer, seq_len: int, domain_ids: dict[str, int],
              fingerprint: str, work_dir: Path):
    def examples(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {k: [] for k in ("input_ids", "prompt_len", "domain", "domain_id", "difficulty",
                                                "prompt", "answer")}
        for j, index in enumerate(indices):
            row = index + 1
            if cmap.text is not None:
                prompt, answer = "", str(_field(batch, j, cmap, "text", name, row))
            else:
                prompt = str(_field(batch, j, cmap, "prompt", name, row))
                answer = str(_field(batch, j, cmap, "answer", name, row))
            domain = str(_field(batch, j, cmap, "domain", name, row)).strip() if cmap.domain else DEFAULT_DOMAIN
            difficulty = int(_field(batch, j, cmap, "difficulty", name, row)) if cmap.difficulty else 0
            ids, prompt_len = encode_example(tokenizer, prompt, answer, seq_len)
            for key, value in (("input_ids", ids), ("prompt_len", prompt_len), ("domain", domain),
                               ("domain_id", domain_ids[domain]), ("difficulty", difficulty),
                               ("prompt", prompt), ("answer", answer)):
                out[key].append(value)
        return out

    # new_fingerprint: the cache key already identifies the result, so datasets need not hash the
    # function (and the tokenizer it closes over); cache_file_name keeps every write in our work dir.
    return raw.map(examples, batched=True, with_indices=True, remove_columns=raw.column_names,
                   features=_features(), new_fingerprint=fingerprint, load_from_cache_file=False,
                   cache_file_name=str(work_dir / f"{fingerprint}.arrow"), desc=f"tokenising {name}")


def _domains_of(raw, cmap: ColumnMap) -> set[str]:
    if cmap.domain is None:
        return {DEFAULT_DOMAIN}
    # Bad values (None, "") are reported with their row number by the tokenising pass.
    return {str(v).strip() for v in raw.unique(cmap.domain) if v is not None and str(v).strip()}


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or info logs from datasets while loading; the caller's settings restored."""
    from datasets.utils import logging as ds_logging

    was_disabled = ds_logging.is_progress_bar_enabled() is False
    level = ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not was_disabled:
            ds_logging.enable_progress_bar()


def _read_cache(target: Path, tokenizer: Tokenizer, hit: bool) -> DataBundle:
    from datasets import load_from_disk

    meta = json.loads((target / _META).read_text(encoding="utf-8"))
    evals = load_from_disk(str(target / "eval")) if meta["has_eval"] else None
    return DataBundle(train=load_from_disk(str(target / "train")), eval=evals, domains=meta["domains"],
                      tokenizer=tokenizer, fingerprint=target.name, cache_hit=hit, cache_path=target)


def load_data(
    params: DataParams,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    base_dir: str | os.PathLike = ".",
    plugins=None,
) -> DataBundle:
    """Tokenised train/eval data for a recipe's ``[data]`` table, from the cache when possible.

    ``base_dir`` is the recipe's directory: relative ``train_files`` / ``eval_files`` / ``hf_name``
    are taken from there. ``cache_dir`` holds the generated corpus (``corpus/``), datasets' own
    files (``hf/``) and the tokenised data (``tokenized/``). Missing or malformed data raises
    :class:`DataError` with one line naming the file and the line, row or column. ``plugins``: the
    plugin set whose ``corpus`` and ``source`` registries name the generated corpus and the data
    format (default: the installed plugins).
    """
    corpus = find_corpus(params.generate.corpus, plugins) if params.generate is not None else None
    bundle = _load(params, tokenizer, Path(cache_dir), Path(base_dir), corpus, plugins)
    bundle.corpus = corpus
    return bundle


def _load(params: DataParams, tokenizer: Tokenizer, cache_dir: Path, base_dir: Path, corpus: Corpus | None,
          plugins=None) -> DataBundle:
    with _quiet_datasets():
        train_sources, eval_sources, columns = _sources(params, cache_dir, base_dir, corpus, plugins)
        key = _cache_key(train_sources, eval_sources, columns, tokenizer, params.seq_len)
        target = cache_dir / "tokenized" / key
        damaged = None
        if (target / _META).is_file():
            try:
                return _read_cache(target, tokenizer, hit=True)
            except Exception as err:  # noqa: BLE001 - a damaged cache (cut, garbage) is a cache: tokenise again
                damaged = _discard(target, err)

        tagged = [("train", s) for s in train_sources] + [("eval", s) for s in eval_sources]
        maps = [source.validate(columns) for _, source in tagged]
        raws = [source.load(cmap) for (_, source), cmap in zip(tagged, maps)]
        domains = sorted(set().union(*(_domains_of(raw, cmap) for raw, cmap in zip(raws, maps))))
        domain_ids = {d: i for i, d in enumerate(domains)}

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{key}.{uuid.uuid4().hex}.tmp"
        work = tmp / "work"
        work.mkdir(parents=True)
        try:
            from datasets import concatenate_datasets

            parts: dict[str, list] = {"train": [], "eval": []}
            for i, ((role, source), raw, cmap) in enumerate(zip(tagged, raws, maps)):
                parts[role].append(_tokenise(raw, cmap, source.name, tokenizer, params.seq_len, domain_ids,
                                             f"{key}-{role}-{i}", work))
            for role, datasets_ in parts.items():
                if datasets_:
                    concatenate_datasets(datasets_).save_to_disk(str(tmp / role))
            meta = {"domains": domains, "has_eval": bool(parts["eval"]),
                    "sources": {role: [s.name for r, s in tagged if r == role] for role in ("train", "eval")}}
            (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            shutil.rmtree(work)
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process finished the same key first; its copy is identical.
                if not (target / _META).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        bundle = _read_cache(target, tokenizer, hit=False)
        bundle.cache_damaged = damaged
        return bundle


def _discard(target: Path, err: Exception) -> str:
    """Move a damaged cache entry out of the way (atomically, then delete it); its one-line reason."""
    from srde_core.data.sources import first_line

    aside = target.parent / f".{target.name}.{uuid.uuid4().hex}.damaged"
    try:
        os.rename(target, aside)
    except OSError:  # another process moved it first
        pass
    shutil.rmtree(aside, ignore_errors=True)
    return f"{type(err).__name__}: {first_line(err)}"
