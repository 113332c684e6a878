"""The ablation table: every recipe of ``recipes/ablations/`` on the cached tiny base, several seeds.

    python benchmarks/ablations.py                          every recipe, seeds 0 and 1, 2 jobs
    python benchmarks/ablations.py recipes/ablations/gated.toml recipes/ablations/sparse.toml
    python benchmarks/ablations.py --seeds 0,1,2 --jobs 1 --set phases.experts.steps=200
    python benchmarks/ablations.py --timing                 step time only, side by side, one job

Each (recipe, seed) runs in its own process (``srde run`` in-process, then the evaluation), ``--jobs``
at a time with ``--threads`` torch threads each, in ``--workdir`` (runs and the shared cache live
there). Every recipe gets ``seed = S`` and ``base_seed = 0``: the experts' initialisation, routing and
data order vary with the seed while all runs share one cached base (trained once, by the first job).

Quality (per finished run, experts on): per-domain and overall eval loss on the eval rows, answer
accuracy by greedy generation, routing purity and NMI (expert x domain over every SRDE layer), the
trainable parameters. The table shows the mean over seeds and, after ``±``, half the range over the
seeds; ``Δ loss`` is paired: variant minus ``sparse`` at the same seed, then averaged.

Speed (``--timing``): each recipe's expert phases run for ``--timing-steps`` steps, one recipe after
the other in one invocation at ``--threads`` threads; the median wall time of a step after the first
5 is compared with the ``sparse`` recipe's. Run it on an idle machine. Every row
also records the median of its last 10 steps (``step_s_end``), for recipes whose cost changes during a
phase (adaptive sparsity after pruning, a learned mask after hardening).

Results go to ``WORKDIR/ablations.json`` (merged across invocations) and the table to stdout and
``WORKDIR/ablations.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from srde_core.hookspecs import hookimpl

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "srde_core" / "recipes" / "ablations"
REFERENCE, BASELINE = "sparse", "peft_lora"
TIMED_PHASE = "experts"  # the step time compared across recipes: the main expert phase


# ---- one run (child process) ---------------------------------------------------------------------

class StepTimer:
    """A plugin object: wall time of every optimiser step and of every phase, and the phases' results."""

    def __init__(self):
        self.last = self.started = 0.0
        self.steps: dict[str, list[float]] = {}
        self.phase_time: dict[str, float] = {}
        self.results: dict[str, dict] = {}

    @hookimpl
    def srde_before_phase(self, phase, run):
        self.last = self.started = time.perf_counter()

    @hookimpl
    def srde_after_step(self, phase, run, step, metrics):
        now = time.perf_counter()
        self.steps.setdefault(phase.name, []).append(now - self.last)
        self.last = now

    @hookimpl
    def srde_after_phase(self, phase, run, metrics):
        self.phase_time[phase.name] = time.perf_counter() - self.started
        self.results[phase.name] = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def run_one(recipe_path: str, seed: int, overrides: list[str], evaluate_run: bool, tag: str = "") -> dict:
    """Run one recipe at one seed in this process; return its row of the table (named ``stem@tag``
    with a tag: a variant of the recipe made by ``--set``)."""
    from rich.console import Console

    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe
    from srde_core.run import execute

    timer = StepTimer()
    plugins = load_plugins(extra=[("ablation-timer", timer)])
    stem = Path(recipe_path).stem + (f"@{tag}" if tag else "")
    recipe = load_recipe(recipe_path, plugins, [f"seed={seed}", "base_seed=0", f"name=ablation-{stem.replace('@', '-')}-s{seed}", *overrides])
    console = Console(file=io.StringIO(), width=140)
    started = time.perf_counter()
    run = execute(recipe, plugins, console, fresh=True)
    row = {"recipe": stem, "seed": seed, "overrides": overrides, "wall_s": time.perf_counter() - started,
           "threads": _threads(), "phase_s": timer.phase_time,
           "step_s": {name: statistics.median(times[min(len(times) - 1, 5):]) for name, times in timer.steps.items()},
           "step_s_end": {name: statistics.median(times[-10:]) for name, times in timer.steps.items()}}
    row["trainable"] = _trainable(run, timer)
    if evaluate_run:
        row.update(_quality(run))
    return row


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _trainable(run, timer: StepTimer) -> int:
    if run.experts is not None:
        return sum(p.numel() for p in run.experts.trainable_parameters().values())
    return next((int(r["trainable_parameters"]) for r in timer.results.values() if "trainable_parameters" in r), 0)


def _quality(run) -> dict:
    """Eval loss per domain, answer accuracy per domain, routing purity and NMI; experts on."""
    from srde_core.evaluate import evaluation_state
    from srde_core.evaluate.accuracy import answer_accuracy
    from srde_core.evaluate.losses import domain_losses, eval_batches, eval_subset, overall_loss
    from srde_core.evaluate.routing import RoutingCounter, summarize

    settings, domains, tokenizer = run.recipe.eval, run.data.domains, run.tokenizer
    rows = eval_subset(run.data.eval, domains, settings.max_examples_per_domain)
    batches = eval_batches(rows, pad_id=tokenizer.pad_id, loss_on=run.recipe.data.loss_on, domains=domains,
                           batch_size=settings.batch_size)
    experts = run.experts
    counter = RoutingCounter(experts.layers, len(domains)) if experts is not None else None
    with evaluation_state(run.model, experts, enabled=True):
        losses = domain_losses(run.model, batches, domains, device=run.device, experts=experts,
                               after_forward=counter.observe if counter else None)
        accuracy = answer_accuracy(run.model, rows, tokenizer, domains, max_new_tokens=settings.max_new_tokens,
                                   batch_size=settings.batch_size, device=run.device)
    routing = summarize(counter.aggregate(), domains) if counter is not None else None
    correct = sum(a.correct for a in accuracy.values())
    examples = sum(a.examples for a in accuracy.values())
    return {
        "loss": {d: losses[d].loss for d in domains} | {"all": overall_loss(losses).loss},
        "accuracy": {d: accuracy[d].accuracy for d in domains} | {"all": correct / max(1, examples)},
        "purity": routing["purity"] if routing else None,
        "nmi": routing["nmi"] if routing else None,
    }


# ---- the table (parent process) ------------------------------------------------------------------

def _mean_pm(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else float("nan")


def _fmt(values: list[float | None], spec: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    mean, pm = _mean_pm(values)
    return f"{mean:{spec}}" + (f" ± {pm:{spec}}" if pm == pm else "")


def table(results: list[dict]) -> str:
    """The markdown table of ``results`` (rows of :func:`run_one`)."""
    by_recipe: dict[str, dict[int, dict]] = {}
    timing: dict[str, dict[int, dict]] = {}
    for row in results:
        (timing if row.get("timing") else by_recipe).setdefault(row["recipe"], {})[row["seed"]] = row
    for name in timing:
        by_recipe.setdefault(name, {})
    order = sorted(by_recipe, key=lambda r: (r != REFERENCE, r.split("@")[0] == BASELINE, r))
    reference = by_recipe.get(REFERENCE, {})
    domains = next((list(r["loss"]) for rows in by_recipe.values() for r in rows.values() if r.get("loss")), [])
    domains = [d for d in domains if d != "all"]
    ref_step = _step_time(timing.get(REFERENCE) or ({} if timing else reference))
    head = (["recipe", "seeds", "trainable", "eval loss", "Δ loss vs sparse", "accuracy %", "purity", "NMI", "step time"]
            + [f"loss {d}" for d in domains])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        rows = by_recipe[name]
        quality = [r for r in rows.values() if r.get("loss")]
        paired = [r["loss"]["all"] - reference[s]["loss"]["all"] for s, r in rows.items()
                  if r.get("loss") and reference.get(s, {}).get("loss")]
        # a tagged variant (another learning rate) computes what its recipe does: its recipe's timing
        timed = timing.get(name) or timing.get(name.split("@")[0])
        step = _step_time(timed or rows) if timed or not timing else None
        cells = [
            name + (" (baseline)" if name.split("@")[0] == BASELINE else ""),
            ",".join(str(s) for s in sorted(rows)) or "—",
            f"{statistics.median(r['trainable'] for r in (rows or timing[name]).values()):,.0f}",
            _fmt([r["loss"]["all"] for r in quality], ".4f"),
            "—" if name == REFERENCE else _fmt(paired, "+.4f"),
            _fmt([r["accuracy"]["all"] for r in quality], ".1f", 100),
            _fmt([r["purity"] for r in quality], ".3f"),
            _fmt([r["nmi"] for r in quality], ".3f"),
            f"{step / ref_step:.2f}x" if step and ref_step else "—",
        ] + [_fmt([r["loss"][d] for r in quality], ".4f") for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _step_time(rows: dict[int, dict]) -> float | None:
    """The median over ``rows`` of the median step time of their main expert phase."""
    per_run = [r["step_s"][TIMED_PHASE] for r in rows.values() if TIMED_PHASE in r.get("step_s", {})]
    return statistics.median(per_run) if per_run else None


# ---- orchestration -------------------------------------------------------------------------------

def budget_overrides(recipe_path: str, budget: float) -> list[str]:
    """``--set`` overrides that run every phase after a ``base_pretrain`` one for ``budget`` times
    its steps (checkpoint intervals, a sampler's warm-up and the adaptive-sparsity schedule scaled
    alike), so recipes with other phase splits keep their proportions."""
    if budget == 1.0:
        return []
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe

    resolved = load_recipe(recipe_path, load_plugins()).resolved

    def scaled(n: int | float) -> int:
        return max(1, round(n * budget))

    overrides = []
    for phase in resolved["phases"]:
        if phase["trainer"]["name"] == "base_pretrain":
            continue
        where = f"phases.{phase['name']}"
        overrides.append(f"{where}.steps={scaled(phase['steps'])}")
        if phase.get("checkpoint_every"):
            overrides.append(f"{where}.checkpoint_every={scaled(phase['checkpoint_every'])}")
        if "warmup_epochs" in phase.get("sampler", {}):
            overrides.append(f"{where}.sampler.warmup_epochs={phase['sampler']['warmup_epochs'] * budget}")
    sparsity = resolved.get("plugins", {}).get("adaptive_sparsity", {})
    density = sparsity.get("density", {}) if sparsity.get("enabled") else {}
    for key in ("steps", "min_steps", "max_steps"):
        if isinstance(density, dict) and density.get(key):
            overrides.append(f"plugins.adaptive_sparsity.density.{key}={scaled(density[key])}")
    return overrides


def _child(recipe: str, seed: int, args, timing: bool) -> dict:
    name = Path(recipe).stem + (f"@{args.tag}" if args.tag else "")
    out = Path(args.workdir) / "rows" / f"{name}-s{seed}{'-timing' if timing else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = ([] if timing else budget_overrides(recipe, args.budget)) + args.overrides
    command = [sys.executable, __file__, "--one", recipe, "--seed", str(seed), "--threads", str(args.threads),
               "--out", str(out), "--tag", args.tag] + [x for o in overrides for x in ("--set", o)]
    if timing:
        command += ["--timing", "--set", f"phases.experts.steps={args.timing_steps}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    done = subprocess.run(command, cwd=args.workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        print(f"FAILED {Path(recipe).stem} seed {seed}: {' / '.join(tail)}", flush=True)
        return {}
    row = json.loads(out.read_text())
    print(f"done {row['recipe']} seed {seed} in {time.perf_counter() - started:.0f}s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe files (default: every recipes/ablations/*.toml)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--workdir", default="runs-ablations", help="working directory of the runs (default runs-ablations)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override applied to every run (repeatable)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="run the phases after the base for this fraction of their steps (default 1)")
    parser.add_argument("--timing", action="store_true", help="measure step time only: one run per recipe, one at a time")
    parser.add_argument("--timing-steps", type=int, default=40, help="expert-phase steps of a timing run (default 40)")
    parser.add_argument("--tag", default="", help="name the rows RECIPE@TAG (a variant made with --set, e.g. a LoRA learning rate)")
    parser.add_argument("--table", action="store_true", help="print the table of the results so far and stop")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.one:  # a child: one run
        import torch

        torch.set_num_threads(args.threads or cores)
        row = run_one(args.one, args.seed, args.overrides, evaluate_run=not args.timing, tag=args.tag)
        row["timing"] = args.timing
        Path(args.out).write_text(json.dumps(row, indent=1))
        return 0

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = str(workdir)
    results_file = workdir / "ablations.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    if not args.table:
        recipes = [str(Path(r).resolve()) for r in args.recipes] or [str(p) for p in sorted(ABLATIONS.glob("*.toml"))]
        jobs = 1 if args.timing else max(1, args.jobs)
        args.threads = args.threads or max(1, cores // jobs)
        seeds = [0] if args.timing else [int(s) for s in args.seeds.split(",") if s.strip()]
        print(f"{platform.processor() or platform.machine()}, {cores} cores: {len(recipes)} recipes x seeds {seeds}, "
              f"{jobs} job(s) x {args.threads} thread(s), in {workdir}", flush=True)
        # the reference recipe first (timing: it is the unit) and alone (it trains and caches the shared base)
        recipes.sort(key=lambda r: Path(r).stem != REFERENCE)
        todo = [(r, s) for r in recipes for s in seeds]
        first, rest = todo[:1], todo[1:]
        new = [_child(r, s, args, args.timing) for r, s in first]
        with ThreadPoolExecutor(jobs) as pool:
            new += list(pool.map(lambda job: _child(job[0], job[1], args, args.timing), rest))
        fresh = {(r["recipe"], r["seed"], r["timing"]) for r in new if r}
        results = [r for r in results if (r["recipe"], r["seed"], r.get("timing", False)) not in fresh] + [r for r in new if r]
        results_file.write_text(json.dumps(results, indent=1))
    text = table(results)
    (workdir / "ablations.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    raise SystemExit(main())
