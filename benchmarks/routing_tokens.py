"""Where a finished run's routing follows the domain: purity per SRDE layer on the prompt tokens, on
the answer (labelled) tokens and on all of them, each beside its domain-blind baseline.

    python benchmarks/routing_tokens.py runs/conventions [--max-examples 50] [--threads 2]
    python benchmarks/routing_tokens.py runs/conventions --probe     # what the base's states tell

Purity is the load-weighted share of each expert's slots that its largest domain holds (see
``srde_core.evaluate.routing``); the baseline is what a router that ignores the domain gets. Under
top-k routing with k > 1 and about as many experts as domains, the purity is capped below 1: with D
domains, k picks each and E experts, at most E of the D * k streams of slots can be pure, so the cap
is ``min(1, E / (D * k))``, printed with the table. The per-expert lines name each expert's largest
domain on the answer tokens and its share.

``--probe`` asks how much of the domain a router *could* read: with the experts off (the frozen base),
a linear probe (ridge least squares on one-hot domains, fit on half of the answer tokens, scored on the
other half) reads the domain from each SRDE layer's MLP input at the answer tokens; it prints the
probe's accuracy over every domain and over the domains other than the first-named ``--except``.
"""

from __future__ import annotations

import argparse
import io
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max-examples", type=int, default=50, help="eval rows per domain (default 50)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", action="store_true", help="a linear probe of the domain on the base's states")
    parser.add_argument("--except", dest="other", default="general",
                        help="the probe's second score leaves this domain out (default general)")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console

    from srde_core.evaluate import evaluation_state
    from srde_core.evaluate.losses import domain_losses, eval_batches, eval_subset
    from srde_core.evaluate.routing import RoutingCounter, baseline_purity, expert_purity, purity
    from srde_core.run import open_finished_run

    from srde_core.errors import SRDEError

    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    try:
        run = open_finished_run(args.run_dir, Console(file=io.StringIO()))
    except SRDEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if run.experts is None:
        print(f"{args.run_dir}: the run has no experts", file=sys.stderr)
        return 2
    domains = run.data.domains
    rows = eval_subset(run.data.eval, domains, args.max_examples)
    batches = eval_batches(rows, pad_id=run.tokenizer.pad_id, loss_on=run.recipe.data.loss_on, domains=domains,
                           batch_size=run.recipe.eval.batch_size)
    counters = {kind: RoutingCounter(run.experts.layers, len(domains), tokens=kind) for kind in RoutingCounter.TOKENS}

    def observe(batch, context):
        for counter in counters.values():
            counter.observe(batch, context)

    if args.probe:
        return probe(run, batches, domains, args.other)
    with evaluation_state(run.model, run.experts, enabled=True):
        domain_losses(run.model, batches, domains, device=run.device, experts=run.experts, after_forward=observe)
    routers = run.experts.routers()
    print(f"{args.run_dir}: {len(rows)} eval rows, domains {', '.join(domains)}")
    print("layer  experts  top-k  cap    | prompt (baseline) | answer (baseline) | all (baseline)")
    for layer in sorted(counters["real"].counts):
        router = routers[layer]
        cap = min(1.0, router.num_experts / (len(domains) * router.top_k))
        cells = [f"{purity(counters[k].counts[layer]):.3f} ({baseline_purity(counters[k].counts[layer]):.3f})"
                 if int(counters[k].counts[layer].sum()) else "— (no tokens)" for k in ("prompt", "answer", "real")]
        print(f"{layer:>5}  {router.num_experts:>7}  {router.top_k:>5}  {cap:.3f}  | " + " | ".join(f"{c:>17}" for c in cells))
    for layer in sorted(counters["answer"].counts):
        counts = counters["answer"].counts[layer].cpu()
        shares = expert_purity(counts)
        tops = [f"e{e}:{domains[int(counts[e].argmax())]} {share:.2f}" for e, share in enumerate(shares) if share is not None]
        print(f"layer {layer} answers, each expert's largest domain: " + ", ".join(tops))
    return 0


def probe(run, batches, domains, other: str) -> int:
    import torch

    from srde_core.evaluate import evaluation_state

    inputs: dict[int, list] = {layer: [] for layer in run.experts.layers}
    labels, current = [], {}

    def hook(module, args):
        inputs[module.layer].append(args[0].reshape(-1, args[0].shape[-1])[current["keep"]].double().cpu())

    handles = [mlp.register_forward_pre_hook(hook) for mlp in run.experts.layers.values()]
    try:
        with evaluation_state(run.model, run.experts, enabled=False), torch.no_grad():
            for batch in batches:
                keep = (batch["labels"] != -100).reshape(-1) & batch["attention_mask"].reshape(-1).bool()
                current["keep"] = keep
                labels.append(batch["domain_ids"][:, None].expand_as(batch["labels"]).reshape(-1)[keep])
                run.model(input_ids=batch["input_ids"].to(run.device), attention_mask=batch["attention_mask"].to(run.device))
    finally:
        for handle in handles:
            handle.remove()
    y = torch.cat(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    fit, score = order[: len(y) // 2], order[len(y) // 2:]
    rest = y[score] != (domains.index(other) if other in domains else -1)
    print(f"linear probe of the domain on the base's MLP inputs at {len(y)} answer tokens "
          f"(chance {1 / len(domains):.3f}; without {other}: {1 / max(1, len(domains) - (other in domains)):.3f})")
    for layer in sorted(inputs):
        x = torch.cat(inputs[layer])
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        a = x[fit]
        w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=a.dtype),
                               a.T @ torch.nn.functional.one_hot(y[fit], len(domains)).double())
        right = (x[score] @ w).argmax(1) == y[score]
        print(f"layer {layer}: accuracy {right.double().mean():.3f}, without {other} {right[rest].double().mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
