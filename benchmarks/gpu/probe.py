"""The measuring plugin of the GPU check: step times, tokens and memory of each phase of a run.

Registered in process next to the entry-point plugins (``load_plugins(extra=...)``), it sees the
run through the hooks alone:

- ``srde_before_phase``: the CUDA peak counters are reset;
- ``srde_forward_context``: the tokens of each training micro-batch (its attention mask) are counted;
- ``srde_after_step``: the time of the step's end (after a device synchronisation) and its tokens;
- ``srde_after_phase``: the peaks of the phase (allocated and reserved by torch's allocator, and the
  whole device's use where NVML answers) and the throughput over the steps after the warm-up steps
  (those compile and fill the caches); the result is written to the JSON file at once, so a run cut
  short still leaves its finished phases.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from srde_core.hookspecs import hookimpl


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _graph_count() -> int | None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"].get("unique_graphs", 0))


class Probe:
    def __init__(self, out: Path, warmup: int, record: dict[str, Any]):
        self.out, self.warmup, self.record = out, warmup, record
        self.record.setdefault("phases", {})
        self._steps: list[tuple[int, float, float]] = []
        self._tokens = 0.0
        self._start = 0.0

    def _write(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(self.out)

    @hookimpl
    def srde_configure_model(self, model, run):
        config = getattr(model, "config", None)
        text = getattr(config, "text_config", None) or config
        self.record["attention"] = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)

    @hookimpl
    def srde_before_phase(self, phase, run):
        if _cuda():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._steps, self._tokens, self._start = [], 0.0, time.perf_counter()

    @hookimpl
    def srde_forward_context(self, context, batch, phase, run):
        mask = batch.get("attention_mask")
        self._tokens += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())

    @hookimpl
    def srde_after_step(self, phase, run, step, metrics):
        if _cuda():
            torch.cuda.synchronize()
        self._steps.append((step, time.perf_counter(), self._tokens))
        self._tokens = 0.0

    @hookimpl
    def srde_after_phase(self, phase, run, metrics):
        steps = self._steps
        times = [t for _, t, _ in steps]
        durations = [b - a for a, b in zip([self._start, *times[:-1]], times)]
        measured = steps[self.warmup:]
        entry: dict[str, Any] = {
            "steps": len(steps),
            "warmup_steps": min(self.warmup, len(steps)),
            "batch_size": phase.batch_size,
            "grad_accum": phase.grad_accum,
            "tokens_per_step": statistics.mean(tok for _, _, tok in steps) if steps else None,
            "first_step_s": durations[0] if durations else None,
            "step_s": statistics.median(durations[self.warmup:]) if measured else None,
            "tokens_per_s": None,
            "loss": metrics.get("loss"),
            "compiled_graphs": _graph_count(),
            "peak_allocated": None, "peak_reserved": None, "device_used_at_end": None,  # bytes, on CUDA only
        }
        if measured:
            elapsed = times[-1] - (times[self.warmup - 1] if self.warmup else self._start)
            entry["tokens_per_s"] = sum(tok for _, _, tok in measured) / max(elapsed, 1e-9)
        if _cuda():
            torch.cuda.synchronize()
            entry["peak_allocated"] = torch.cuda.max_memory_allocated()
            entry["peak_reserved"] = torch.cuda.max_memory_reserved()
            try:
                entry["device_used_at_end"] = torch.cuda.device_memory_used()
            except Exception:  # noqa: BLE001 - NVML missing or not answering: no device-level reading
                pass
        self.record["phases"][phase.name] = entry
        self._write()
