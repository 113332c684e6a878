"""Where a recipe's data comes from, checked before any of it is tokenised.

A data format (``data.format``) is a component of kind ``source``: :class:`DataFormat`. The
built-ins (JSON Lines / JSON, Parquet, CSV, an HF dataset's split) live in the ``data`` plugin. A
format gives :class:`Source` objects: each has an ``identity`` (a content hash, or the dataset's
fingerprint) that keys the tokenisation cache, and ``load()`` returns a ``datasets.Dataset``. Files
are validated first, so bad data fails with one line naming the file and the line or column instead
of a builder's traceback. The core keeps the column mapping and the checks every format shares.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srde_core.data.params import ColumnsParams, DataParams
from srde_core.errors import DataError

# Roles of the columns a recipe maps, in the order examples are built from them.
REQUIRED_PAIR = ("prompt", "answer")
OPTIONAL = ("domain", "difficulty")


def resolve_paths(paths: list[str], base_dir: str | os.PathLike) -> list[Path]:
    """``paths`` as given in a recipe, relative ones taken from ``base_dir`` (the recipe's directory)."""
    base = Path(base_dir)
    return [p if p.is_absolute() else base / p for p in (Path(s).expanduser() for s in paths)]


@dataclass(frozen=True)
class ColumnMap:
    """The dataset column behind each field, ``None`` when the field is absent.

    Text mode (``text`` set) has no prompt/answer split: prompt is empty and the answer is the text.
    """

    prompt: str | None
    answer: str | None
    text: str | None
    domain: str | None
    difficulty: str | None

    def used(self) -> list[str]:
        return [c for c in (self.prompt, self.answer, self.text, self.domain, self.difficulty) if c]


def map_columns(columns: ColumnsParams, available: list[str], name: str) -> ColumnMap:
    """Match the recipe's ``[data.columns]`` to a dataset's columns.

    ``domain`` and ``difficulty`` left at their defaults are optional: a dataset without them gets
    domain ``"general"`` and difficulty 0. Any column the recipe names explicitly must exist.
    """
    explicit = columns.model_fields_set

    def need(column: str) -> str:
        if column not in available:
            raise DataError(f"column '{column}' not found (columns: {', '.join(available) or 'none'})", source=name)
        return column

    if columns.text is not None:
        if explicit & set(REQUIRED_PAIR):
            raise DataError("set either columns.text or columns.prompt/answer, not both", source=name)
        prompt, answer, text = None, None, need(columns.text)
    else:
        prompt, answer, text = need(columns.prompt), need(columns.answer), None
    optional = {}
    for role in OPTIONAL:
        column = getattr(columns, role)
        if column is None or (role not in explicit and column not in available):
            optional[role] = None
        else:
            optional[role] = need(column)
    return ColumnMap(prompt=prompt, answer=answer, text=text, **optional)


def value_problem(role: str, value: object) -> str | None:
    """Why ``value`` cannot fill ``role`` (``None`` when it can): text fields take strings or
    numbers, ``difficulty`` takes an integer."""
    if value is None:
        return "is empty"
    if role == "difficulty":
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
                return f"is not an integer ({value!r})"
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"is not a string ({type(value).__name__})"
    if role == "domain" and not str(value).strip():
        return "is an empty domain name"
    return None


@dataclass
class Source:
    """One file or HF split. ``name`` is what errors show; ``identity`` keys the cache."""

    name: str
    identity: str
    load: Callable[[ColumnMap], object]
    validate: Callable[[ColumnsParams], ColumnMap]


class DataFormat:
    """A data format (kind ``source``, named by ``data.format``).

    A file format implements :meth:`validate` (read the file, check every row against the column
    mapping, return it; a problem is one :class:`DataError` naming the file and the line, row or
    column) and :meth:`load` (the file as a ``datasets.Dataset``); the core hashes the file for
    the cache and reports a missing one. A format whose data is not ``train_files`` /
    ``eval_files`` (an HF dataset) overrides :meth:`sources` instead.
    """

    #: the registered name (``data.format``); file sources' cache identities start with it
    name: str = ""

    def sources(self, data: DataParams, base_dir: Path, hf_cache: Path) -> tuple[list[Source], list[Source]]:
        """The train and eval sources of ``data`` (paths relative to ``base_dir``)."""
        train = [self.open(p, hf_cache, "data.train_files") for p in resolve_paths(data.train_files, base_dir)]
        evals = [self.open(p, hf_cache, "data.eval_files") for p in resolve_paths(data.eval_files, base_dir)]
        return train, evals

    def open(self, path: Path, hf_cache: Path, key: str) -> Source:
        """A local data file; ``key`` is the recipe key that named it (for 'file not found')."""
        name = str(path)
        if not path.is_file():
            raise DataError(f"file not found ({key})", source=name)
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return Source(name=name, identity=f"{self.name}:{digest.hexdigest()}",
                      load=lambda cmap: self.load(path, cmap, hf_cache),
                      validate=lambda columns: self.validate(path, columns))

    def validate(self, path: Path, columns: ColumnsParams) -> ColumnMap:
        """The column mapping of the file at ``path``, every row checked."""
        raise NotImplementedError(f"format '{self.name}' reads no files")

    def load(self, path: Path, cmap: ColumnMap, hf_cache: Path) -> Any:
        """The file at ``path`` as a ``datasets.Dataset`` (``hf_cache``: datasets' own cache)."""
        raise NotImplementedError(f"format '{self.name}' reads no files")


def find_format(name: str | DataFormat, plugins: Any = None) -> DataFormat:
    """The data format registered as ``name`` (the built-ins and every installed plugin's), built."""
    if isinstance(name, DataFormat):
        return name
    from srde_core.plugins import load_plugins
    from srde_core.recipe.resolve import resolve_component

    return resolve_component(plugins if plugins is not None else load_plugins(), "source", name).build()


def check_rows(name: str, rows, columns: ColumnsParams, where: str, available: list[str] | None = None) -> ColumnMap:
    """Validate parsed rows (``(number, dict)`` pairs); ``where`` is ``"line"``, ``"item"`` or
    ``"row"``; ``available``: the file's columns (a CSV header), else every key some row has."""
    rows = list(rows)
    if not rows:
        raise DataError("no rows", source=name)
    if available is None:
        seen: dict[str, None] = {}
        for _, row in rows:
            seen.update(dict.fromkeys(row))
        available = list(seen)
    cmap = map_columns(columns, available, name)
    for number, row in rows:
        for role in ("prompt", "answer", "text", "domain", "difficulty"):
            column = getattr(cmap, role)
            if column is None:
                continue
            if column not in row:
                raise DataError(f"column '{column}' missing", source=name, key=f"{where} {number}")
            problem = value_problem(role, row[column])
            if problem:
                raise DataError(f"column '{column}' {problem}", source=name, key=f"{where} {number}")
    return cmap


def check_types(cmap: ColumnMap, schema, name: str) -> ColumnMap:
    """The mapped columns of a typed table (Parquet, an HF dataset) hold what their roles take:
    text fields strings or numbers, ``difficulty`` integers or strings; a list or struct column
    is refused for the whole file, as a JSON file's first such value is."""
    import pyarrow as pa

    for role in ("prompt", "answer", "text", "domain", "difficulty"):
        column = getattr(cmap, role)
        if column is None:
            continue
        kind = schema.field(column).type
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
        number = pa.types.is_integer(kind) or (role != "difficulty" and pa.types.is_floating(kind))
        if not (text or number or pa.types.is_dictionary(kind)):
            wanted = "an integer" if role == "difficulty" else "a string"
            raise DataError(f"column '{column}' is not {wanted} ({kind})", source=name)
    return cmap


def read_text(path: Path) -> str:
    """The file as UTF-8 text; other bytes end in one line naming the file and the offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason} at byte {err.start})", source=str(path)) from None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
