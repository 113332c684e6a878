"""The GPU check's result: the variants' records, their plans, the comparisons, and a printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GiB = 1024**3
PHASE1, JOINT = "pretrain", "experts"  # the phase names of recipes/max.toml


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _tps(variants: dict[str, Any], name: str, phase: str) -> float | None:
    return (variants.get(name, {}).get("phases", {}).get(phase) or {}).get("tokens_per_s")


def memory_rows(variants: dict[str, Any], plans: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant and phase: measured peaks (bytes) against that phase's plan, and the ratios."""
    rows = []
    for name, record in variants.items():
        for phase, entry in (record.get("phases") or {}).items():
            plan = plans.get(name, {}).get("phases", {}).get(phase, {})
            rows.append({
                "variant": name, "phase": phase,
                "peak_allocated": entry.get("peak_allocated"), "peak_reserved": entry.get("peak_reserved"),
                "plan_tensors": plan.get("tensors"), "plan_total": plan.get("total"),
                "allocated_over_plan_tensors": _ratio(entry.get("peak_allocated"), plan.get("tensors")),
                "reserved_over_plan_total": _ratio(entry.get("peak_reserved"), plan.get("total")),
            })
    return rows


def comparisons(variants: dict[str, Any], experts: int) -> dict[str, Any]:
    """flash vs sdpa and compile vs eager (tokens/s ratios per phase: >1 means the first is faster),
    and Phase 1 parallel vs sequential (the same examples per expert and update: the whole Phase 1
    is ``speedup`` times faster in parallel)."""
    out: dict[str, Any] = {}
    for key, (a, b) in {"flash_vs_sdpa": ("headline", "sdpa"), "compile_vs_eager": ("headline", "eager")}.items():
        out[key] = {phase: _ratio(_tps(variants, a, phase), _tps(variants, b, phase)) for phase in (PHASE1, JOINT)}
    out["flash_vs_sdpa"]["attention"] = {n: variants.get(n, {}).get("attention") for n in ("headline", "sdpa")}
    parallel, sequential = _tps(variants, "headline", PHASE1), _tps(variants, "phase1-sequential", PHASE1)
    out["phase1_parallel_vs_sequential"] = {
        "experts": experts, "parallel_tokens_per_s": parallel, "sequential_tokens_per_s": sequential,
        "speedup": _ratio(parallel, sequential),
    }
    return out


def report(settings: dict[str, Any], experts: int, plans: dict[str, Any], launches: dict[str, tuple[str, str]],
           results: Path, environment: dict[str, Any]) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for name, (status, tail) in launches.items():
        path = results / f"{name}.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"variant": name}
        if record.get("status") in (None, "running"):  # the process ended (or was ended) inside the run
            record["status"] = "timeout" if status == "timeout" else ("skipped" if status == "skipped" else "failed")
        if record["status"] != "ok":
            record.setdefault("error", tail)
        record["plan"] = plans.get(name)
        variants[name] = record
    result = {"settings": settings, "environment": environment, "variants": variants,
              "memory": memory_rows(variants, plans), "comparisons": comparisons(variants, experts)}
    print_report(result)
    return result


def _gib(value: float | None) -> str:
    return f"{value / GiB:7.2f}" if value is not None else "      -"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def print_report(result: dict[str, Any]) -> None:
    s, env = result["settings"], result["environment"]
    print(f"GPU check ({s['mode']}): {s['layers']} layers, seq_len {s['seq_len']}, {s['warmup']} warm-up + "
          f"{s['steps']} measured steps per phase; gpu {env['gpu']}; torch {env['versions']['torch']}")
    print(f"{'variant':18} {'phase':9} {'attention':22} {'tok/s':>10} {'step s':>7} "
          f"{'alloc GiB':>9} {'plan':>7} {'resv GiB':>8} {'plan+':>7}")
    memory = {(r["variant"], r["phase"]): r for r in result["memory"]}
    for name, record in result["variants"].items():
        attention = str(record.get("attention"))
        if (record.get("flash_attention") or {}).get("pinned"):
            attention += " (flash kernel)"
        if not record.get("phases"):
            print(f"{name:18} {record['status']}: {str(record.get('error', '')).splitlines()[-1:] or ''}")
        for phase, entry in (record.get("phases") or {}).items():
            m = memory[(name, phase)]
            tps = f"{entry['tokens_per_s']:10.0f}" if entry.get("tokens_per_s") else "         -"
            step = f"{entry['step_s']:7.3f}" if entry.get("step_s") else "      -"
            print(f"{name:18} {phase:9} {attention[:22]:22} {tps} {step} {_gib(m['peak_allocated']):>9} "
                  f"{_gib(m['plan_tensors'])} {_gib(m['peak_reserved']):>8} {_gib(m['plan_total'])}")
        if record["status"] != "ok" and record.get("phases"):
            print(f"{name:18} {record['status']}")
    c = result["comparisons"]
    print("(plan: `srde plan` tensors; plan+: with the CUDA context and allocator margin)")
    for key, label in (("flash_vs_sdpa", "flash vs sdpa"), ("compile_vs_eager", "compile vs eager")):
        print(f"{label:18} Phase 1 {_x(c[key].get('pretrain'))}, joint {_x(c[key].get('experts'))} (tokens/s ratio)")
    p = c["phase1_parallel_vs_sequential"]
    print(f"Phase 1 parallel vs sequential ({p['experts']} experts, equal examples per expert): {_x(p['speedup'])}")
