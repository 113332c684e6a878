"""GPU check: recipes/max.toml at full width on 4 layers: throughput and memory against `srde plan`.

``bash benchmarks/gpu/run.sh`` (installs the carried wheels, then runs this) on one CUDA GPU runs
a max-shaped recipe: ``recipes/max.toml`` (Phase 1 with its sampler and router warm start, the
joint phase, gradient checkpointing, bf16, DeepSpeed ZeRO-2 kept on one process with
``engine.one_process = "zero"``, flash attention, regional compile) on a Ministral 3 built from its
config (the real 14B widths of ``recipes/model_configs/``, ``--layers`` decoder layers, random
weights: none are downloaded), with the tekken tokenizer shipped in mistral-common and generated
rows of about ``seq_len`` tokens (one domain per expert). Each variant runs in its own process,
``--warmup`` + ``--steps`` steps per phase:

- ``headline``: everything on;
- ``eager``: compile off;
- ``phase1-sequential``: Phase 1 on one domain's rows at the batch each expert gets in parallel
  (``--per-expert-batch``), i.e. one expert trained at a time. Both train every expert on the same
  examples per update, so Phase 1 takes ``experts`` times a sequential step for each parallel step,
  and the speed-up of the parallel step is the ratio of their tokens/s;
- ``sdpa``: flash attention off (the recipe's sdpa).

It prints, per variant and phase, tokens/s (over the steps after the warm-up, which compile) and the
peak memory allocated and reserved by torch against ``srde plan`` of the same recipe (the plan's
tensors and its total with the CUDA context and allocator margin), then flash vs sdpa, compile vs
eager and Phase 1 parallel vs sequential, and writes all of it to ``--json``. Variants run in that
order while ``--budget-s`` lasts (10 minutes less a margin by default); one that fails or runs out of
time is recorded with why, and the others still run. Without a flash-attention package the flash
variants pin PyTorch's SDPA to its own flash kernel (the JSON says which ran).

``--cpu-smoke`` runs the same code on CPU at toy size (narrow widths, 2 layers, the 32k v3 tokenizer,
2 steps per phase, sdpa, compile with dynamo's ``eager`` backend: traced, no code generated; all
variants in one process): ``tests/test_gpu_kit.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MAX = ROOT / "recipes" / "max.toml"
MODEL_CONFIG = ROOT / "recipes" / "model_configs" / "mistralai--Ministral-3-14B-Reasoning-2512.toml"
TOKENIZER_FILE = "tekken_240911.json"  # shipped with mistral-common, as the v3 SentencePiece file
SMOKE_TOKENIZER = ("mistral_instruct_tokenizer_240323.model.v3", 32768)  # (file, vocabulary): a 4x smaller LM head
VARIANTS = ("headline", "eager", "phase1-sequential", "sdpa")  # the order they run in: the cheaper first
FEATURES = {  # variant -> (flash attention, compile, Phase 1 one expert at a time)
    "headline": (True, True, False), "sdpa": (False, True, False),
    "eager": (True, False, False), "phase1-sequential": (True, True, True),
}
SMOKE_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 32, "vocab_size": SMOKE_TOKENIZER[1]}
SMOKE_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
                "head_dim": 16, "image_size": 28, "patch_size": 14}
WORDS = ("the of and to in is it that for on with as was at by be this from or have not are but one all were "
         "when there can an which their if has more will about what so out up time two new some would these other "
         "only may also first any its into over after most").split()  # one token each after a space, in both tokenizers


def settings(args) -> dict[str, Any]:
    smoke = args.cpu_smoke
    return {
        "mode": "cpu-smoke" if smoke else "gpu",
        "device": "cpu" if smoke else "cuda",
        "layers": args.layers or (2 if smoke else 4),
        "seq_len": args.seq_len or (32 if smoke else 2048),
        "warmup": args.warmup if args.warmup is not None else (1 if smoke else 2),
        "steps": args.steps or (1 if smoke else 5),
        "tokenizer": SMOKE_TOKENIZER[0] if smoke else TOKENIZER_FILE,
        "per_expert_batch": args.per_expert_batch,
        "joint_batch": args.joint_batch,
        "compile_backend": "eager" if smoke else "inductor",
        "flash": not smoke,
    }


def max_recipe() -> dict[str, Any]:
    return tomllib.loads(MAX.read_text(encoding="utf-8"))


def model_config(s: dict[str, Any]) -> dict[str, Any]:
    """The shipped 14B config with ``layers`` decoder layers (narrow widths in the smoke mode)."""
    config = tomllib.loads(MODEL_CONFIG.read_text(encoding="utf-8"))
    config.pop("source", None)
    config.pop("model_type", None)
    config["text_config"]["num_hidden_layers"] = s["layers"]
    if s["mode"] == "cpu-smoke":
        config["text_config"].update(SMOKE_TEXT)
        config["vision_config"] = dict(SMOKE_VISION)
    return config


def fit_row(tokenizer, words: list[str], seq_len: int) -> tuple[str, str, int]:
    """(prompt, answer, tokens): the first 55% of the words the prompt, the rest the answer, as
    many words as make the encoded example ``seq_len`` tokens (or the nearest below)."""
    from srde_core.data.dataset import encode_example

    def encoded(n: int) -> tuple[str, str, int]:
        cut = max(1, int(n * 0.55))
        prompt, answer = " ".join(words[:cut]), " ".join(words[cut:n])
        return prompt, answer, len(encode_example(tokenizer, prompt, answer, 10**9)[0])

    n = len(words)
    best = None
    for _ in range(4 * seq_len):
        row = encoded(n)
        if row[2] == seq_len:
            return row
        if row[2] < seq_len:
            best = row if best is None or row[2] > best[2] else best
            if n == len(words) or encoded(n + 1)[2] > seq_len:
                return best
            n += 1
        else:
            n -= max(1, (row[2] - seq_len) // 2)
    return best or encoded(n)


def write_data(work: Path, s: dict[str, Any], domains: int) -> tuple[Path, Path]:
    """JSONL rows of ``seq_len`` tokens each (prompt 55% of the words, answer the rest; none
    truncated, all of one length: no padding, one shape for compile), as many per domain as a
    phase draws: every domain's, and the first domain's alone."""
    from srde_core.data.params import TokenizerParams
    from srde_core.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TokenizerParams(file=s["tokenizer"]))
    seq_len, rng = s["seq_len"], random.Random(0)
    per_domain = max(2, (s["warmup"] + s["steps"]) * max(s["per_expert_batch"], 1))
    rows = []
    for d in range(domains):
        for _ in range(per_domain):
            prompt, answer, _ = fit_row(tokenizer, [rng.choice(WORDS) for _ in range(2 * seq_len)], seq_len)
            rows.append({"prompt": prompt, "answer": answer, "domain": f"domain{d}", "difficulty": 1})
    everything, first = work / "data" / "train.jsonl", work / "data" / "one_domain.jsonl"
    everything.parent.mkdir(parents=True, exist_ok=True)
    everything.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    first.write_text("".join(json.dumps(r) + "\n" for r in rows if r["domain"] == "domain0"), encoding="utf-8")
    return everything, first


def variant_recipe(name: str, s: dict[str, Any], work: Path, data: tuple[Path, Path]) -> Path:
    """The recipe of one variant: max.toml with the kit's model, data, sizes and switches."""
    import tomli_w

    flash, compiled, sequential = FEATURES[name]
    base = max_recipe()
    experts = base["srde"]["layout"]["num_experts"]
    steps = s["warmup"] + s["steps"]
    phases = []
    for phase in base["phases"]:
        phase = {**phase, "steps": steps, "grad_accum": 1, "checkpoint_every": 0, "keep_checkpoints": 1, "log_every": 1,
                 "scheduler": {**phase["scheduler"], "warmup_steps": 1}}
        trainer = phase["trainer"] if isinstance(phase["trainer"], str) else phase["trainer"]["name"]
        if trainer != "expert_pretrain":
            phase["batch_size"] = s["joint_batch"]
        else:
            phase["batch_size"] = s["per_expert_batch"] * (1 if sequential else experts)
            phase["trainer"] = {**phase["trainer"], "warm_start_router": not sequential,
                                "warm_start_examples": max(1, s["per_expert_batch"])}
        phases.append(phase)
        if sequential:
            break
    recipe = {
        "extends": str(MAX),
        "name": f"gpu-check-{name}",
        "output_dir": str(work / "runs"),
        "cache_dir": str(work / "cache"),
        "device": s["device"],
        "engine": {"name": "deepspeed", "zero_stage": 2, "one_process": "zero"},
        "model": {"name_or_path": "", "config": model_config(s)},
        "tokenizer": {"from_model": False, "file": s["tokenizer"]},
        "data": {"train_files": [str(data[1] if sequential else data[0])], "eval_files": [], "seq_len": s["seq_len"]},
        "phases": phases,
        "plugins": {"flash_attention": {"enabled": flash and s["flash"]},
                    "compile": {"enabled": compiled, "backend": s["compile_backend"]}},
    }
    path = work / "recipes" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    return path


def plan_of(path: Path) -> dict[str, Any]:
    """`srde plan` of the recipe on one GPU: the whole run (the peak over phases and transitions)
    and each phase alone, in bytes."""
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe
    from srde_plugins.runtime.plan import plan_memory

    recipe = load_recipe(path, load_plugins())

    def one(plan) -> dict[str, Any]:
        return {"tensors": plan.allocated, "total": plan.total, "peak_at": plan.peak}

    return {"run": one(plan_memory(recipe, gpus=1)),
            "phases": {p.name: one(plan_memory(recipe, gpus=1, phase=p.name)) for p in recipe.phases}}


def run_variants(names: list[str], s: dict[str, Any], work: Path, out: Path) -> int:
    """In this process: each variant's run with the probe; its record goes to ``out/NAME.json``."""
    import contextlib

    import torch
    from rich.console import Console

    import srde
    from probe import Probe
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe

    failed = 0
    for name in names:
        path = work / "recipes" / f"{name}.toml"
        record: dict[str, Any] = {"variant": name, "recipe": str(path), "status": "running"}
        plugins = load_plugins(extra=[("gpu-check-probe", Probe(out / f"{name}.json", s["warmup"], record))])
        pin = contextlib.nullcontext()
        if FEATURES[name][0] and s["flash"]:
            from srde_plugins.attention import _decision

            chosen, why = _decision(load_recipe(path, plugins))
            record["flash_attention"] = {"implementation": chosen, "why": why}
            if chosen == "sdpa" and torch.cuda.is_available():
                from torch.nn.attention import SDPBackend, sdpa_kernel

                pin = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
                record["flash_attention"]["pinned"] = "torch SDPA flash kernel"
        started = time.perf_counter()
        try:
            with pin:
                srde.run(path, fresh=True, plugins=plugins, console=Console(stderr=True))
            record["status"] = "ok"
        except BaseException as err:  # noqa: BLE001 - recorded; the next variant still runs
            if isinstance(err, KeyboardInterrupt):
                raise
            record["status"], record["error"] = "failed", f"{type(err).__name__}: {str(err).strip()[:2000]}"
            failed += 1
        record["seconds"] = time.perf_counter() - started
        (out / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 1 if failed else 0


def launch(names: list[str], args, s: dict[str, Any], work: Path, timeout: float) -> tuple[str, str]:
    """Run ``names`` in a child process of this script; (status, log tail)."""
    log = work / "logs" / f"{'+'.join(names)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(names), "--work", str(work),
               *(["--cpu-smoke"] if args.cpu_smoke else []), *forwarded(args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    with log.open("w", encoding="utf-8") as f:
        try:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=work).returncode
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
    return status, "\n".join(tail)


def forwarded(args) -> list[str]:
    out = []
    for flag in ("layers", "seq_len", "warmup", "steps", "per_expert_batch", "joint_batch"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy size on CPU, all variants in one process")
    parser.add_argument("--json", type=Path, default=None, help="the result file (default: WORK/check.json)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "srde-gpu-check",
                        help="runs, data, recipes and logs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock seconds for all variants")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; smoke 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048, max's; smoke 32)")
    parser.add_argument("--warmup", type=int, default=None, help="steps per phase left out of tokens/s (default 2; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per phase (default 5; smoke 1)")
    parser.add_argument("--per-expert-batch", type=int, default=1, help="Phase 1 rows per expert per step")
    parser.add_argument("--joint-batch", type=int, default=4, help="joint-phase batch size (max's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = settings(args)
    work = args.work.resolve()
    if args.child:
        return run_variants(args.child.split(","), s, work, work / "results")
    from report import report

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    started = time.monotonic()
    deadline = started + args.budget_s
    (work / "results").mkdir(parents=True, exist_ok=True)
    for old in (work / "results").glob("*.json"):
        old.unlink()
    experts = max_recipe()["srde"]["layout"]["num_experts"]
    data = write_data(work, s, experts)
    plans = {name: plan_of(variant_recipe(name, s, work, data)) for name in names}
    prepared = time.monotonic() - started
    launches: dict[str, tuple[str, str]] = {}
    groups = [names] if args.cpu_smoke else [[n] for n in names]
    for group in groups:
        left = deadline - time.monotonic()
        if left < 30:
            launches.update({n: ("skipped", f"out of time ({args.budget_s:.0f} s budget)") for n in group})
            continue
        status = launch(group, args, s, work, left)
        launches.update({n: status for n in group})
    result = report(s, experts, plans, launches, work / "results", environment())
    result["seconds"] = {"prepare": prepared, "total": time.monotonic() - started}
    path = args.json or work / "check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0 if all(v["status"] == "ok" for v in result["variants"].values()) else 1


def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "deepspeed", "flash-attn", "mistral-common", "datasets", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "gpu": gpu, "cpu_count": os.cpu_count(), "versions": versions}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
