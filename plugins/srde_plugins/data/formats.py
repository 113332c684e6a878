"""The built-in file formats (``data.format``): ``json`` (JSON Lines, or one JSON array), ``csv`` and
``parquet``. Each checks every row before ``datasets`` reads the file, so bad data is one line naming
the file and the line, item, row or column."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from srde_core.data.params import ColumnsParams
from srde_core.data.sources import ColumnMap, DataFormat, check_rows, check_types, first_line, map_columns, read_text
from srde_core.errors import DataError


class DatasetsFormat(DataFormat):
    """A file read by the ``datasets`` builder of the same name."""

    def __init__(self, params=None):
        pass

    def options(self, cmap: ColumnMap) -> dict:
        """Extra arguments of the builder."""
        return {}

    def load(self, path: Path, cmap: ColumnMap, hf_cache: Path):
        from datasets import load_dataset

        try:
            return load_dataset(self.name, data_files=[str(path)], split="train", cache_dir=str(hf_cache),
                                **self.options(cmap))
        except Exception as err:  # noqa: BLE001 - the builders raise many types for bad files
            raise DataError(f"cannot be read as {self.name} ({first_line(err)})", source=str(path)) from err


class JsonFormat(DatasetsFormat):
    """JSON Lines (one object a line; blank lines skipped) or one JSON array of objects."""

    name = "json"

    def validate(self, path: Path, columns: ColumnsParams) -> ColumnMap:
        name = str(path)
        text = read_text(path)
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
            return check_rows(name, rows, columns, "item")

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

        return check_rows(name, parsed(), columns, "line")


class CsvFormat(DatasetsFormat):
    """A header row, then one example a row."""

    name = "csv"

    def options(self, cmap: ColumnMap) -> dict:
        # Read mapped columns as text: type inference would turn an answer "007" into 7 and an
        # answer "NA" into a missing value.
        return {"converters": {c: str for c in cmap.used()}, "keep_default_na": False}

    def validate(self, path: Path, columns: ColumnsParams) -> ColumnMap:
        """Every row checked like a JSON Lines line: a row with fewer fields than the header is missing
        the columns at its end (the CSV reader would fill them with empty strings), one with more has
        a stray delimiter. Rows are numbered from 1 after the header, blank lines skipped."""
        name = str(path)
        reader = csv.reader(io.StringIO(read_text(path).removeprefix("\ufeff"), newline=""))  # a BOM is no column
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
        return check_rows(name, rows, columns, "row", available=header)


class ParquetFormat(DatasetsFormat):
    """A Parquet table; its column types are checked from the metadata."""

    name = "parquet"

    def validate(self, path: Path, columns: ColumnsParams) -> ColumnMap:
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(path)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for a non-Parquet file vary
            raise DataError(f"not a Parquet file ({first_line(err)})", source=str(path)) from err
        if metadata.num_rows == 0:
            raise DataError("no rows", source=str(path))
        schema = metadata.schema.to_arrow_schema()
        return check_types(map_columns(columns, schema.names, str(path)), schema, str(path))
