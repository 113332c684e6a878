"""Phase 1 wall time: experts pre-trained one after another vs all in one batched step.

The tiny model (``recipes/tiny.toml``'s config, random init) with ``--experts`` experts per layer
and as many domains, trained with the Phase-1 phase of ``recipes/ablations/phase1.toml`` (its LR,
schedule, clipping, losses) through the code a run uses: ``expert_pretrain``'s forced-routing
objective, the supervised step, the ``torch`` engine's session, the step driver's batches (rows
selected from a ``datasets.Dataset`` and collated every step). Equal work per expert in both:

- sequential (as the original code did): for each expert in turn, a fresh optimiser and
  ``--steps`` steps on batches of ``--batch-per-expert`` examples of its own domain only, all
  routed to it;
- parallel (``expert_pretrain``): ``--steps`` steps on batches of ``experts x batch-per-expert``
  examples, ``batch-per-expert`` from each domain (the ``domain_balanced`` sampler), each example
  forced to its domain's expert, one forward and backward per step.

So every expert gets the same number of optimiser updates on the same number of its own examples.
Synthetic rows (random tokens, all ``--seq-len`` long, labels on the last 45% as with answer-only
loss) keep every batch the same shape in both. Checkpoint writing and the router warm start (once
per phase in both) are left out. Rounds interleave the two; medians are compared.
Run ``python benchmarks/phase1_speed.py --help``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from srde_core.data.groups import group_rows
from srde_core.model.build import attach_recipe_experts, model_class
from srde_core.plugins import load_plugins
from srde_core.recipe import load_recipe, resolve_component
from srde_core.run import RunContext
from srde_core.train.driver import Batches, StepContext, TrainingTarget
from srde_core.train.engine import OptimizerSpec
from srde_core.train.objective import supervised_step
from srde_plugins.trainers.expert_pretrain import ForcedObjective

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ablations" / "phase1.toml"
VOCAB = 32768  # the v3 tokenizer's vocabulary, as in tiny


def synthetic_rows(domains: list[str], per_domain: int, seq_len: int, generator: torch.Generator):
    from datasets import Dataset

    ids = torch.randint(3, VOCAB, (len(domains) * per_domain, seq_len), generator=generator)
    return Dataset.from_dict({
        "input_ids": ids.tolist(),
        "prompt_len": [int(seq_len * 0.55)] * len(ids),
        "domain": [d for d in domains for _ in range(per_domain)],
        "domain_id": [i for i in range(len(domains)) for _ in range(per_domain)],
    })


def build_run(args, device: torch.device):
    """A run context holding what the Phase-1 step touches: the recipe, plugins, engine, data, model."""
    from rich.console import Console

    plugins = load_plugins()
    overrides = [f"srde.layout.num_experts={args.experts}", f"seed={args.seed}"]
    recipe = load_recipe(RECIPE, plugins, overrides)
    phase = next(p for p in recipe.phases if p.trainer.name == "expert_pretrain")
    run = RunContext(recipe, plugins, Path(tempfile.gettempdir()), device, Console(file=io.StringIO()))
    run.engine = recipe.engine.build()
    domains = [f"d{e}" for e in range(args.experts)]
    generator = torch.Generator().manual_seed(args.seed)
    rows_per_domain = args.steps * args.batch_per_expert  # one epoch of each domain over the steps
    run.data = SimpleNamespace(train=synthetic_rows(domains, rows_per_domain, args.seq_len, generator), domains=domains)
    run.tokenizer = SimpleNamespace(pad_id=2)
    cls = model_class(recipe.model.architecture)
    torch.manual_seed(args.seed)
    config = cls.config_class(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, **recipe.model.config)
    run.model = cls._from_config(config, dtype=torch.float32, attn_implementation=recipe.model.attn_implementation).to(device)
    run.model.config.use_cache = False
    run.experts = attach_recipe_experts(run.model, recipe)
    return run, phase


def bank_parameters(run) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in run.experts.trainable_parameters().items() if n.startswith("banks.")}


def train(run, phase, steps: int, data, batch_size: int, sampler: str) -> None:
    """``steps`` Phase-1 steps on ``data`` at ``batch_size`` with a fresh optimiser (a session)."""
    choice = resolve_component(run.plugins, "sampler", sampler)
    phase = phase.model_copy(update={"steps": steps, "batch_size": batch_size, "sampler": choice})
    run.data.train = data
    target = TrainingTarget(run.model, list(bank_parameters(run).values()), run.experts.adapter.state_dict,
                            run.experts.adapter.load_state_dict)
    step_fn = supervised_step(ForcedObjective(run, phase, run.model, run.experts))
    session = run.engine.start(target, OptimizerSpec.from_phase(phase), run)
    batches = Batches(run, phase)
    run.model.train()
    try:
        for step in range(steps):
            step_fn(StepContext(run, phase, step, session, batches))
    finally:
        session.close()


def sequential(run, phase, args, everything) -> None:
    shards = group_rows(everything, "domain")
    for domain in run.data.domains:
        own = everything.select(shards.rows(domain))
        train(run, phase, args.steps, own, args.batch_per_expert, "shuffled")


def parallel(run, phase, args, everything) -> None:
    train(run, phase, args.steps, everything, args.experts * args.batch_per_expert, "domain_balanced")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (and domains)")
    parser.add_argument("--steps", type=int, default=5, help="optimiser updates per expert")
    parser.add_argument("--batch-per-expert", type=int, default=4, help="examples of its domain per expert per update")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    run, phase = build_run(args, device)
    everything = run.data.train
    start_state = {n: p.detach().clone() for n, p in bank_parameters(run).items()}
    variants = {"sequential": sequential, "parallel": parallel}

    def timed(name: str) -> float:
        with torch.no_grad():
            for n, p in bank_parameters(run).items():
                p.copy_(start_state[n])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        variants[name](run, phase, args, everything)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for name in variants:  # warm-up
        timed(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % 2:] + names[: r % 2]:  # alternate which goes first
            times[name].append(timed(name))

    seq, par = statistics.median(times["sequential"]), statistics.median(times["parallel"])
    examples = args.steps * args.batch_per_expert
    print(f"Phase 1, tiny Ministral 3 ({RECIPE.relative_to(RECIPE.parents[2])} phase '{phase.name}'), "
          f"{args.experts} experts, device={device} threads={torch.get_num_threads()} (cpu cores {os.cpu_count()}), "
          f"median of {args.repeats}")
    print(f"each expert: {args.steps} updates x {args.batch_per_expert} examples of its domain = {examples} examples, "
          f"seq_len {args.seq_len}")
    print(f"  sequential  {seq:8.2f} s   {args.experts} x {args.steps} steps at batch {args.batch_per_expert}, "
          f"one expert at a time")
    print(f"  parallel    {par:8.2f} s   {args.steps} steps at batch {args.experts * args.batch_per_expert}, "
          f"all experts in one forward/backward")
    print(f"  parallel is {seq / par:.2f}x faster than sequential (the seed claims 8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
