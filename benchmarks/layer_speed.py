"""Forward+backward time of ONE gated MLP block: frozen floor vs PEFT LoRA vs SRDE variants.

The variants of the same block run side by side in one process, interleaved round by round (so
drifting machine load hits all of them alike), and the medians are compared:

- floor: the frozen base MLP; only activation gradients (the input requires grad);
- lora: PEFT LoRA on gate/up/down_proj, rank R chosen so its trainable parameter count matches
  sparse SRDE's;
- srde: SRDE with sparse deltas (magnitude selector), ``--experts`` experts, top ``--top-k``;
- lora-1x1: SRDE with the ``lora`` delta, 1 expert, top-1, rank R (plain LoRA through SRDE);
- lora-Ex k: SRDE with the ``lora`` delta, ``--experts`` experts, top ``--top-k``, rank R/E each
  (equal trainable deltas to PEFT LoRA);
- blkHxW: SRDE with sparse deltas at block positions ``block = [H, W]`` (``--blocks``), same
  density, hence the same trainable count as srde.

Targets: sparse SRDE <= 1.5x LoRA and <= 2x the floor; lora-1x1 <= 1.10x LoRA; lora-Ex k <= 1.3x
LoRA; the first block variant <= 1.2x LoRA and <= 1.6x the floor. Run ``python benchmarks/layer_speed.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component

TARGET_VS_LORA = 1.5
TARGET_VS_FLOOR = 2.0
TARGET_LORA_ONE_EXPERT = 1.10
TARGET_LORA_EXPERTS = 1.3
TARGET_BLOCK_VS_LORA = 1.2
TARGET_BLOCK_VS_FLOOR = 1.6


class GatedMLP(nn.Module):
    """The HF-style gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_srde(base: nn.Module, spec: dict, experts: int, top_k: int, generator: torch.Generator) -> SRDEMLP:
    hidden = base.gate_proj.in_features
    plugins = load_plugins()
    delta = resolve_component(plugins, "delta", spec).build()
    router = resolve_component(plugins, "router", "topk").build().make_router(hidden, experts, top_k, generator)
    banks = {
        name: delta.make_bank(getattr(base, name).weight.detach(), experts, generator)
        for name in PROJECTIONS
    }
    mlp = SRDEMLP(base, router, banks)
    with torch.no_grad():  # trained-looking deltas (speed does not depend on the values)
        for bank in banks.values():
            for name in bank.trainable_names:
                getattr(bank, name).normal_(0.0, 1e-3, generator=generator)
    return mlp


def build_lora(base: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    return get_peft_model(base, config)


def step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        model(x).backward(grad)

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def run_shape(hidden: int, intermediate: int, args, device: torch.device) -> tuple[dict[str, tuple[float, int]], int]:
    """(variant -> (median ms, trainable parameters), LoRA rank) for one shape."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    base = GatedMLP(hidden, intermediate).requires_grad_(False)

    sparse = {"name": "sparse", "density": args.density, "selector": {"name": "magnitude", "assignment": "shared"}}
    srde = build_srde(copy.deepcopy(base), sparse, args.experts, args.top_k, generator)
    srde_count = trainable(srde)
    per_rank = 3 * (hidden + intermediate)  # LoRA: rank * (in + out) per projection
    rank = max(args.experts, round(srde_count / per_rank / args.experts) * args.experts)
    lora = build_lora(copy.deepcopy(base), rank)
    lora_spec = {"name": "lora", "rank": rank, "alpha": 2.0 * rank}
    lora_one = build_srde(copy.deepcopy(base), lora_spec, 1, 1, generator)
    lora_spec = {"name": "lora", "rank": rank // args.experts, "alpha": 2.0 * rank // args.experts}
    lora_many = build_srde(copy.deepcopy(base), lora_spec, args.experts, args.top_k, generator)

    models = {"floor": base, "lora": lora, "srde": srde, "lora-1x1": lora_one, f"lora-{args.experts}x{args.top_k}": lora_many}
    for bh, bw in parse_blocks(args.blocks):
        models[f"blk{bh}x{bw}"] = build_srde(copy.deepcopy(base), {**sparse, "block": [bh, bw]}, args.experts, args.top_k, generator)
    for name, model in models.items():
        model.to(device)
        if not isinstance(model, SRDEMLP):  # SRDE keeps float32 master weights for its routers and deltas
            model.to(dtype)
        elif dtype != torch.float32:
            model.base.to(dtype)
    x = torch.randn(args.tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, hidden, device=device, dtype=dtype)
    steps = {name: step_fn(model, x, grad) for name, model in models.items()}

    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(args.repeats):
        # Rotate the order each round so no variant always runs right after another.
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(steps[name], device))
    return {name: (statistics.median(times[name]), trainable(models[name])) for name in models}, rank


def parse_blocks(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.strip().split("x")) for item in text.split(",") if item.strip()]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        hidden, _, intermediate = item.strip().partition("x")
        shapes.append((int(hidden), int(intermediate)))
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="512x2048,1024x4096", help="HIDDENxINTERMEDIATE, comma-separated")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per forward pass")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", default="1,2,all", help="torch CPU thread counts to sweep, comma-separated ('all': every core)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--experts", type=int, default=8, help="SRDE experts per block")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--density", type=float, default=0.01, help="sparse delta density per expert")
    parser.add_argument("--blocks", default="16x16,4x4", help="block variants HxW, comma-separated ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cores = os.cpu_count() or 1
    sweep = list(dict.fromkeys(cores if t.strip() == "all" else int(t) for t in args.threads.split(",")))
    print(f"cpu: {cpu_model()} ({cores} cores); device={device} torch={torch.__version__}")
    ok = True
    for threads in sweep:
        torch.set_num_threads(threads)
        ok &= run_sweep_point(args, device)
    return 0 if ok or not args.strict else 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_sweep_point(args, device) -> bool:
    print()
    print(
        f"threads={torch.get_num_threads()} tokens={args.tokens} dtype={args.dtype} "
        f"experts={args.experts} top_k={args.top_k} density={args.density} repeats={args.repeats} (median)"
    )
    header = f"{'shape':>11} {'variant':>11} {'ms':>9} {'trainable':>10} {'vs floor':>9} {'vs lora':>8}"
    many = f"lora-{args.experts}x{args.top_k}"
    print(header)
    print("-" * len(header))
    ok = True
    for hidden, intermediate in parse_shapes(args.shapes):
        result, rank = run_shape(hidden, intermediate, args, device)
        floor_ms, lora_ms = result["floor"][0], result["lora"][0]
        for name, (ms, count) in result.items():
            label = f"lora r={rank}" if name == "lora" else name
            print(
                f"{hidden:>5}x{intermediate:<5} {label:>11} {ms:9.1f} {count:10,d} "
                f"{ms / floor_ms:8.2f}x {ms / lora_ms:7.2f}x"
            )
        srde_ms = result["srde"][0]
        vs_lora, vs_floor = srde_ms / lora_ms, srde_ms / floor_ms
        met = vs_lora <= TARGET_VS_LORA and vs_floor <= TARGET_VS_FLOOR
        ok &= met
        print(
            f"{'':>11} SRDE/LoRA {vs_lora:.2f}x (target <= {TARGET_VS_LORA}x), "
            f"SRDE/floor {vs_floor:.2f}x (target <= {TARGET_VS_FLOOR}x): {'met' if met else 'MISSED'}"
        )
        one, experts = result["lora-1x1"][0] / lora_ms, result[many][0] / lora_ms
        lora_met = one <= TARGET_LORA_ONE_EXPERT and experts <= TARGET_LORA_EXPERTS
        ok &= lora_met
        print(
            f"{'':>11} lora-1x1/LoRA {one:.2f}x (target <= {TARGET_LORA_ONE_EXPERT}x), "
            f"{many}/LoRA {experts:.2f}x (target <= {TARGET_LORA_EXPERTS}x): {'met' if lora_met else 'MISSED'}"
        )
        blocks = parse_blocks(args.blocks)
        if blocks:
            name = "blk{}x{}".format(*blocks[0])
            vs_lora, vs_floor = result[name][0] / lora_ms, result[name][0] / floor_ms
            block_met = vs_lora <= TARGET_BLOCK_VS_LORA and vs_floor <= TARGET_BLOCK_VS_FLOOR
            ok &= block_met
            print(
                f"{'':>11} {name}/LoRA {vs_lora:.2f}x (target <= {TARGET_BLOCK_VS_LORA}x), "
                f"{name}/floor {vs_floor:.2f}x (target <= {TARGET_BLOCK_VS_FLOOR}x): {'met' if block_met else 'MISSED'}"
            )
    return ok


if __name__ == "__main__":
    sys.exit(main())
