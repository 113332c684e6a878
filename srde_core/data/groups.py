"""A dataset grouped by one column: the row indices of each value, computed once and cached.

``group_rows(dataset, column)`` splits the rows of a ``datasets.Dataset`` by the value of
``column`` — grouped by ``domain``, these are the per-domain shards of the tokenised training data
that Phase 1 draws domain-pure or domain-balanced batches from. The groups partition
``range(len(dataset))``: every row is in exactly one group, the rows of a group ascending.

They are computed from the Arrow column alone (a dictionary encoding and a stable argsort; no
Python loop over rows, no text re-read or re-tokenised) and cached twice: in this process's memory,
and on disk beside the dataset's own Arrow files, as ``groups/<fingerprint>-<column>.npz``. For the
run's training data those files lie in ``cache_dir/tokenized/<key>/``, whose key covers the
sources' contents, the tokenizer and ``seq_len``; the dataset's fingerprint (from that key, or
from whatever ``map`` / ``select`` a plugin applied) names the file, so changed data never reads
another dataset's groups. A dataset held only in memory is grouped in memory.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Groupings kept in memory (per fingerprint and column), most recently used last.
MEMORY_ENTRIES = 8
_memory: OrderedDict[tuple[str, str, int], Groups] = OrderedDict()


@dataclass(frozen=True)
class Groups:
    """``values`` (sorted) and, for the ``i``-th, the rows ``order[offsets[i]:offsets[i + 1]]``.

    ``source`` says where this copy came from: ``"computed"``, ``"disk"`` or ``"memory"``.
    """

    column: str
    values: tuple[Any, ...]
    order: np.ndarray
    offsets: np.ndarray
    source: str = "computed"

    def rows(self, value: Any) -> np.ndarray:
        """The row indices (ascending) whose ``column`` holds ``value``."""
        i = self.values.index(value)
        return self.order[self.offsets[i] : self.offsets[i + 1]]

    def sizes(self) -> dict[Any, int]:
        return {value: int(self.offsets[i + 1] - self.offsets[i]) for i, value in enumerate(self.values)}


def group_rows(dataset: Any, column: str) -> Groups:
    """The rows of ``dataset`` grouped by ``column``: from memory, from the disk cache beside the
    dataset's Arrow files, or computed (and then written there). Raises ``KeyError`` for a missing
    column and ``ValueError`` for a column with empty (null) values."""
    if column not in dataset.column_names:
        raise KeyError(column)
    fingerprint = getattr(dataset, "_fingerprint", None)
    key = (fingerprint, column, len(dataset))
    if fingerprint and key in _memory:
        _memory.move_to_end(key)
        return _with_source(_memory[key], "memory")
    path = cache_path(dataset, column)
    groups = _read(path, column, len(dataset)) if path is not None else None
    if groups is None:
        groups = compute_groups(dataset, column)
        if path is not None:
            try:
                _write(path, groups)
            except OSError:  # a read-only cache: grouped again by the next process
                pass
    if fingerprint:
        _memory[key] = groups
        while len(_memory) > MEMORY_ENTRIES:
            _memory.popitem(last=False)
    return groups


def clear_memory() -> None:
    """Forget the groupings held in memory (the disk cache stays): the next call reads the disk,
    as a new process would."""
    _memory.clear()


def cache_path(dataset: Any, column: str) -> Path | None:
    """Where the groups of ``dataset`` by ``column`` are kept: ``groups/<fingerprint>-<column>.npz``
    beside the dataset's first Arrow file; None for a dataset in memory."""
    files = getattr(dataset, "cache_files", None) or []
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not files or not fingerprint:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in column)
    return Path(files[0]["filename"]).parent / "groups" / f"{fingerprint}-{safe}.npz"


def compute_groups(dataset: Any, column: str) -> Groups:
    """Group the rows from the Arrow column: dictionary-encode it, rank the distinct values, and
    sort the row indices by their value's rank (stable, so each group's rows stay ascending)."""
    import pyarrow.compute as pc

    table = dataset.select_columns([column]).with_format("arrow")[:]  # a selection's rows, in its order
    values = table.column(column).combine_chunks()
    if values.null_count:
        raise ValueError(f"column '{column}' has {values.null_count} empty values; they cannot be grouped")
    encoded = pc.dictionary_encode(values)
    dictionary = encoded.dictionary.to_pylist()
    rank = np.empty(len(dictionary), dtype=np.int64)
    rank[sorted(range(len(dictionary)), key=dictionary.__getitem__)] = np.arange(len(dictionary))
    codes = rank[np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]
    order = np.argsort(codes, kind="stable").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(dictionary)))]).astype(np.int64)
    return Groups(column, tuple(sorted(dictionary)), order, offsets)


def _with_source(groups: Groups, source: str) -> Groups:
    return Groups(groups.column, groups.values, groups.order, groups.offsets, source)


def _read(path: Path, column: str, rows: int) -> Groups | None:
    """The cached groups at ``path``, or None when absent or not those of ``rows`` rows."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            values = tuple(json.loads(str(stored["values"])))
            order, offsets = stored["order"], stored["offsets"]
    except (OSError, ValueError, KeyError):
        return None
    if len(order) != rows or len(offsets) != len(values) + 1 or int(offsets[-1]) != rows:
        return None
    return Groups(column, values, order, offsets, "disk")


def _write(path: Path, groups: Groups) -> None:
    """Write under a temporary name and rename into place: the file is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as f:
            np.savez(f, values=np.array(json.dumps(list(groups.values))), order=groups.order, offsets=groups.offsets)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
