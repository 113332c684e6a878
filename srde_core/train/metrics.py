"""metrics.jsonl: one JSON object per logged step (and per phase summary).

The file stays strict JSON Lines whatever happens to the run: a value that is not a finite number
(a skipped step's NaN loss) is written as ``null``, and each record is appended with one
``write`` of the whole line, so a killed run leaves at most a partial last line, which opening
the log (``--resume``) cuts off.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def _line(record: dict[str, Any]) -> str:
    return json.dumps(strict(record), sort_keys=True, allow_nan=False) + "\n"


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self.repair()

    def repair(self) -> None:
        """Cut a partial last line (a run killed while appending) off the file."""
        if not self.path.is_file():
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            f.truncate(data.rfind(b"\n") + 1)

    def write(self, record: dict[str, Any]) -> None:
        data = _line(record).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)  # one append of the whole line
            while written < len(data):  # only on a full disk or a signal: finish the line
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """The records; lines that are not JSON objects (a partial last line) are left out."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def truncate_after(self, phase: str, step: int) -> None:
        """Drop records of ``phase`` after ``step`` (a resumed run writes them again)."""
        kept = [r for r in self.read() if not (r.get("phase") == phase and r.get("step", 0) > step)]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(_line(r) for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
