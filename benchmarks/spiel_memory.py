"""Memory of the ``spiel`` selector's growth measurement at a Ministral-3-14B MLP shape.

    python benchmarks/spiel_memory.py [--experts 8] [--density 0.01] [--tokens 512]

One ``down_proj``-shaped bank (out 5120, in 16384), ``--experts`` experts at ``--density``, top-2
routing of ``--tokens`` random tokens: a forward and backward of an update step, then the
drop-and-grow update, once with ``grow = "dense"`` and once with ``grow = "candidates"``, each in its
own process, beside the same step with the fixed ``magnitude`` selector. Printed per mode: the selector's persistent state (saved with checkpoints), and the
process's peak resident memory during the step and the update above what it held just before
(sampled every 0.5 ms), next to the bank's trainable parameters for scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil

OUT, IN = 5120, 16384  # Ministral-3-14B: hidden 5120, intermediate 16384 (down_proj: in = intermediate)


def child(mode: str, experts: int, density: float, tokens: int) -> dict:
    import torch

    from srde_core.dist import SINGLE
    from srde_core.model.components import BankCall
    from srde_core.model.context import ForwardContext
    from srde_core.model.routing import Routing
    from srde_core.plugins import load_plugins
    from srde_core.recipe import resolve_component

    torch.manual_seed(0)
    selector = "magnitude" if mode == "fixed" else {"name": "spiel", "every": 1, "fraction": 0.1, "grow": mode}
    spec = {"name": "sparse", "density": density, "selector": selector}
    delta = resolve_component(load_plugins(), "delta", spec).build()
    weight = torch.randn(OUT, IN)
    bank = delta.make_bank(weight, experts, torch.Generator().manual_seed(0))
    del weight
    bank.values.requires_grad_(True)
    state = sum(t.numel() * t.element_size() for t in bank.selector.state_dict().values()) if bank.selector else 0
    trainable = sum(bank.get_parameter(n).numel() * 4 for n in bank.trainable_names)
    x = torch.randn(tokens, IN)
    logits = torch.randn(tokens, experts)
    routing = Routing(torch.topk(logits, 2, dim=1).indices, torch.rand(tokens, 2), logits.softmax(-1), logits, experts)
    moved_from = bank.entry_positions().clone()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        bank(x, BankCall(routing, ForwardContext())).sum().backward()
        if bank.selector is not None:
            bank.selector.after_step(bank, 1, 10, SINGLE)
    finally:
        done.set()
        sampler.join()
    positions = bank.entry_positions()
    moved = sum(int((~torch.isin(positions[e], moved_from[e])).sum()) for e in range(experts))
    return {"mode": mode, "state_mib": state / 2**20, "peak_mib": (peak[0] - before) / 2**20,
            "trainable_mib": trainable / 2**20, "moved": moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.experts, args.density, args.tokens)))
        return
    print(f"spiel at a {OUT}x{IN} bank, {args.experts} experts, density {args.density}, {args.tokens} tokens top-2")
    rows = []
    for mode in ("fixed", "dense", "candidates"):
        cmd = [sys.executable, __file__, "--child", mode, "--experts", str(args.experts),
               "--density", str(args.density), "--tokens", str(args.tokens)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    for r in rows:
        name = "magnitude (fixed)" if r["mode"] == "fixed" else f"spiel grow={r['mode']}"
        print(f"  {name:<22} selector state {r['state_mib']:7.1f} MiB   step + update peak {r['peak_mib']:7.1f} MiB"
              f"   above fixed {r['peak_mib'] - rows[0]['peak_mib']:7.1f} MiB   entries moved {r['moved']}")
    print(f"  (trainable values + importance: {rows[0]['trainable_mib']:.1f} MiB)")


if __name__ == "__main__":
    main()
