"""Forward+backward time of one ``dynamic_sparse`` bank at its lowest vs its highest budget.

One bank (``--out`` x ``--in`` weight, ``--experts`` experts, top ``--top-k``, ``--tokens`` tokens,
``min_density`` .. ``max_density`` in ``--levels`` levels) runs with every token at the lowest budget
(easy inputs) and with every token at the highest (hard inputs), through the forward context's
``budget``; a third case splits the tokens evenly over the levels. The cases are interleaved round
by round (drifting machine load hits all alike) and the medians compared: with the kernel's work
``O(k T n_l)``, the low budget should take about ``min_density / max_density`` of the high one's
time plus the parts that do not shrink (gathering inputs, the routing, the head).

    python benchmarks/dynamic_sparsity.py --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from srde_core.model.components import BankCall
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=4096, help="output features of the weight")
    parser.add_argument("--in", dest="in_features", type=int, default=1024, help="input features of the weight")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--min-density", type=float, default=0.005)
    parser.add_argument("--max-density", type=float, default=0.02)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each case once per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    spec = {"name": "dynamic_sparse", "min_density": args.min_density, "max_density": args.max_density,
            "levels": args.levels, "selector": "magnitude"}
    delta = resolve_component(load_plugins(), "delta", spec).build()
    weight = torch.randn(args.out, args.in_features, generator=generator)
    bank = delta.make_bank(weight, args.experts, generator)
    with torch.no_grad():
        bank.values.normal_(0.0, 1e-3, generator=generator)
    x = torch.randn(args.tokens, args.in_features, generator=generator, requires_grad=True)
    logits = torch.randn(args.tokens, args.experts, generator=generator, requires_grad=True)

    fractions = bank.level_fractions()
    cases = {
        "low": torch.full((args.tokens,), float(fractions[0])),
        "high": torch.full((args.tokens,), float(fractions[-1])),
        "mixed": fractions[torch.arange(args.tokens) % len(fractions)],
    }

    def step(budget: torch.Tensor) -> float:
        start = time.perf_counter()
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, args.top_k, dim=-1)
        routing = Routing(experts=experts, weights=weights, probs=probs, logits=logits, num_experts=args.experts)
        y = bank(x, BankCall(routing, ForwardContext(budget=budget)))
        y.sum().backward()
        elapsed = time.perf_counter() - start
        x.grad = logits.grad = None
        bank.zero_grad(set_to_none=True)
        return elapsed

    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.warmup + args.rounds):
        for name, budget in cases.items():
            elapsed = step(budget)
            if round_ >= args.warmup:
                times[name].append(elapsed)

    print(f"cpu: {platform.processor() or platform.machine()}  torch {torch.__version__}  threads: {torch.get_num_threads()}")
    print(f"bank: out={args.out} in={args.in_features} experts={args.experts} top_k={args.top_k} "
          f"tokens={args.tokens} entries per level {bank.level_counts()}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:>6}: {median * 1e3:8.2f} ms  (median of {args.rounds}, forward+backward)")
    print(f"low / high: {medians['low'] / medians['high']:.2f}  "
          f"(entries {bank.level_counts()[0] / bank.level_counts()[-1]:.2f})   "
          f"mixed / high: {medians['mixed'] / medians['high']:.2f}")


if __name__ == "__main__":
    main()
