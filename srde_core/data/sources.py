"""Where a recipe's data comes from, checked before any of it is tokenised.

A :class:`Source` is one data file (JSON Lines / JSON, Parquet, CSV) or one split of an HF dataset.
Its ``identity`` (a content hash, or the dataset's fingerprint) keys the tokenisation cache, and
``load()`` reads it through ``datasets`` — the same path for the generated corpus and for a user's
data. Files are validated first, so bad data fails with one line naming the file and the line or
column instead of a builder's traceback.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from srde_core.data.params import ColumnsParams
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


def file_source(path: Path, fmt: str, hf_cache: Path, key: str) -> Source:
    """A local data file; ``key`` is the recipe key that named it (for 'file not found')."""
    name = str(path)
    if not path.is_file():
        raise DataError(f"file not found ({key})", source=name)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)

    def load(cmap: ColumnMap):
        return _load_with_datasets(fmt, path, hf_cache, cmap)

    def validate(columns: ColumnsParams) -> ColumnMap:
        return _VALIDATORS[fmt](path, columns)

    return Source(name=name, identity=f"{fmt}:{digest.hexdigest()}", load=load, validate=validate)


def _load_with_datasets(fmt: str, path: Path, hf_cache: Path, cmap: ColumnMap):
    from datasets import load_dataset

    options = {}
    if fmt == "csv":
        # Read mapped columns as text: type inference would turn an answer "007" into 7 and an
        # answer "NA" into a missing value.
        options = {"converters": {c: str for c in cmap.used()}, "keep_default_na": False}
    try:
        return load_dataset(fmt, data_files=[str(path)], split="train", cache_dir=str(hf_cache), **options)
    except Exception as err:  # noqa: BLE001 - the builders raise many types for bad files
        raise DataError(f"cannot be read as {fmt} ({first_line(err)})", source=str(path)) from err


def _check_rows(name: str, rows, columns: ColumnsParams, where: str, available: list[str] | None = None) -> ColumnMap:
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


def _validate_json(path: Path, columns: ColumnsParams) -> ColumnMap:
    name = str(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg})", source=name, key=f"line {err.lineno}") from err
        rows = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError("expected a JSON object", source=name, key=f"item {i}")
            rows.append((i, item))
        return _check_rows(name, rows, columns, "item")

    def parsed():
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err.msg})", source=name, key=f"line {number}") from err
            if not isinstance(row, dict):
                raise DataError("expected a JSON object", source=name, key=f"line {number}")
            yield number, row

    return _check_rows(name, parsed(), columns, "line")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; other bytes end in one line naming the file and the offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason} at byte {err.start})", source=str(path)) from None


def _validate_csv(path: Path, columns: ColumnsParams) -> ColumnMap:
    """Every row checked like a JSON Lines line: a row with fewer fields than the header is missing
    the columns at its end (the CSV reader would fill them with empty strings), one with more has
    a stray delimiter. Rows are numbered from 1 after the header, blank lines skipped."""
    import io

    name = str(path)
    reader = csv.reader(io.StringIO(_read_text(path).removeprefix("\ufeff"), newline=""))  # a BOM is no column
    try:
        header = next(reader, None)
        if not header:
            raise DataError("no header row", source=name)
        rows = []
        for number, fields in enumerate((f for f in reader if f), 1):
            if len(fields) > len(header):
                raise DataError(f"{len(fields)} fields, but the header has {len(header)}", source=name,
                                key=f"row {number}")
            rows.append((number, dict(zip(header, fields))))
    except csv.Error as err:
        raise DataError(f"not valid CSV ({err})", source=name, key=f"line {reader.line_num}") from None
    return _check_rows(name, rows, columns, "row", available=header)


def _validate_parquet(path: Path, columns: ColumnsParams) -> ColumnMap:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors for a non-Parquet file vary
        raise DataError(f"not a Parquet file ({first_line(err)})", source=str(path)) from err
    if metadata.num_rows == 0:
        raise DataError("no rows", source=str(path))
    schema = metadata.schema.to_arrow_schema()
    return _check_types(map_columns(columns, schema.names, str(path)), schema, str(path))


def _check_types(cmap: ColumnMap, schema, name: str) -> ColumnMap:
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


_VALIDATORS = {"json": _validate_json, "csv": _validate_csv, "parquet": _validate_parquet}


def hf_source(name: str, split: str, base_dir: Path, hf_cache: Path, key: str) -> Source:
    """One split of an HF dataset: a directory written by ``save_to_disk``, a local dataset
    directory, or a hub name (which needs the network or a filled HF cache)."""
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    shown = f"{name}[{split}]"
    offline = None
    try:
        if (local / "dataset_dict.json").is_file():
            from datasets import load_from_disk

            splits = load_from_disk(str(local))
            if split not in splits:
                raise DataError(f"split '{split}' not found (splits: {', '.join(splits)})", source=name, key=key)
            dataset = splits[split]
        elif (local / "state.json").is_file():
            from datasets import load_from_disk

            dataset = load_from_disk(str(local))
        else:
            import contextlib

            from datasets import load_dataset

            from srde_core.data.hub import datasets_offline, offline_reason

            # a hub name: from the local cache alone where the hub cannot be used (no retries)
            offline = None if local.is_dir() else offline_reason()
            target = str(local) if local.is_dir() else name
            with datasets_offline() if offline else contextlib.nullcontext():
                dataset = load_dataset(target, split=split, cache_dir=str(hf_cache))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - hub, builder and split errors all end here
        why = f"not in the local HF cache, and the hub cannot be used: {offline}" if offline else first_line(err)
        raise DataError(f"cannot load split '{split}' ({why})", source=name, key=key) from err

    def validate(columns: ColumnsParams) -> ColumnMap:
        if len(dataset) == 0:
            raise DataError("no rows", source=shown)
        return _check_types(map_columns(columns, list(dataset.column_names), shown), dataset.data.schema, shown)

    return Source(name=shown, identity=f"hf:{name}:{split}:{dataset._fingerprint}", load=lambda cmap: dataset,
                  validate=validate)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
