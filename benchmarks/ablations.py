"""The ablation table: every recipe of ``recipes/ablations/`` on the cached tiny base, several seeds.

    python benchmarks/ablations.py                          every recipe, seeds 0, 1 and 2, 2 jobs
    python benchmarks/ablations.py --suite conventions      recipes/ablations/conventions/ (the second benchmark)
    python benchmarks/ablations.py --suite conventions --lr-sweep 0.3,1,3
                                                            each recipe's learning rates x 0.3, 1 and 3 on the
                                                            validation split, then the table at the best
    python benchmarks/ablations.py --suite conventions --lr-sweep sparse:10,lora_delta:0.1 --sweep-only
                                                            widen two recipes' grids; the choice is re-made
    python benchmarks/ablations.py recipes/ablations/gated.toml recipes/ablations/sparse.toml
    python benchmarks/ablations.py --seeds 0,1,2 --jobs 1 --set phases.experts.steps=200
    python benchmarks/ablations.py --timing                 step time only, side by side, one job

Each (recipe, seed) runs in its own process (``srde run`` in-process, then the evaluation), ``--jobs``
at a time with ``--threads`` torch threads each, in ``--workdir`` (runs and the shared cache live
there). Every recipe gets ``seed = S`` and ``base_seed = 0``: the experts' initialisation, routing and
data order vary with the seed while all runs share one cached base (trained once, by the first job).

Quality (per finished run, experts on): per-domain and overall eval loss on the eval rows, answer
accuracy by greedy generation, routing purity and NMI (expert x domain over every SRDE layer, every
real token), answer purity (the same on the answer tokens only, each layer's experts apart: the mean
of the layers' purities; per layer in the row's ``answer_purity_layers``), the trainable parameters. The table shows the mean over seeds and, after ``±``, the half-width of its 95%
t-interval over the seeds; ``Δ loss`` and ``Δ acc`` are paired (variant minus ``sparse`` at the same
seed) with the 95% t-interval of the paired differences. With fewer than ``--min-seeds`` (3) seeds an
interval comes instead from a paired bootstrap over the eval rows (the same rows resampled for both
recipes and every seed; percentile interval), marked ``b``. A difference whose interval excludes 0
is marked ``*``.

Learning rates (``--lr-sweep M1,M2,...``): every recipe runs once per multiplier ``M`` (the first
seed; every phase after the base at ``M`` times its learning rate) and is evaluated on the data's
validation split (``data.generate.held_out = "validation"``, rows disjoint from the eval split);
the multiplier of lowest validation loss is kept (``WORKDIR/lr_choice.json``, merged across sweeps)
and the table's seeds run with it, on the eval split. A recipe without a sweep of its own runs at the
multiplier chosen for ``sparse``: the features are variants of the same experts at the same budget. The sweep runs at the table's ``--budget``. The validation runs
train their own copy of the cached base once (their data differs in the held-out file).

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
SUITES = {"tiny": ABLATIONS, "conventions": ABLATIONS / "conventions"}
REFERENCE, BASELINE = "sparse", "peft_lora"
CONFIDENCE = 0.95
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
    import torch

    from srde_core.evaluate.accuracy import answer_accuracy, is_correct
    from srde_core.evaluate.generation import greedy_generate
    from srde_core.evaluate.losses import domain_losses, eval_batches, eval_subset, overall_loss
    from srde_core.evaluate.routing import RoutingCounter, summarize

    settings, domains, tokenizer = run.recipe.eval, run.data.domains, run.tokenizer
    rows = eval_subset(run.data.eval, domains, settings.max_examples_per_domain)
    batches = eval_batches(rows, pad_id=tokenizer.pad_id, loss_on=run.recipe.data.loss_on, domains=domains,
                           batch_size=settings.batch_size)
    experts = run.experts
    counter = RoutingCounter(experts.layers, len(domains)) if experts is not None else None
    answers = RoutingCounter(experts.layers, len(domains), tokens="answer") if experts is not None else None
    row_nll: list[float] = []
    row_tokens: list[int] = []
    captured: list = []

    def forward(fn):  # keep each batch's per-token NLL, to sum it per row after the forward
        out = fn(run.model)
        captured.append(out[0])
        return out

    def after_forward(batch, context):
        keep = batch["labels"][:, 1:] != -100
        which = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        nll = captured.pop().double()
        row_nll.extend(torch.zeros(keep.shape[0], dtype=torch.float64, device=nll.device).index_add_(0, which, nll).tolist())
        row_tokens.extend(keep.sum(1).tolist())
        if counter is not None:
            counter.observe(batch, context)
            answers.observe(batch, context)

    continuations: list = []

    def generate(*args, **kwargs):
        out = greedy_generate(*args, **kwargs)
        continuations.extend(out)
        return out

    with evaluation_state(run.model, experts, enabled=True):
        losses = domain_losses(run.model, batches, domains, device=run.device, experts=experts,
                               after_forward=after_forward, forward=forward)
        accuracy = answer_accuracy(run.model, rows, tokenizer, domains, max_new_tokens=settings.max_new_tokens,
                                   batch_size=settings.batch_size, device=run.device, generate=generate,
                                   corpus=run.data.corpus)
    columns = rows[:]
    row_correct = [int(is_correct(d, a, tokenizer.decode(ids), run.data.corpus))
                   for d, a, ids in zip(columns["domain"], columns["answer"], continuations)]
    routing = summarize(counter.aggregate(), domains) if counter is not None else None
    by_layer = answers.to_json(domains) if answers is not None else None
    correct = sum(a.correct for a in accuracy.values())
    examples = sum(a.examples for a in accuracy.values())
    return {
        "loss": {d: losses[d].loss for d in domains} | {"all": overall_loss(losses).loss},
        "accuracy": {d: accuracy[d].accuracy for d in domains} | {"all": correct / max(1, examples)},
        "purity": routing["purity"] if routing else None,
        "nmi": routing["nmi"] if routing else None,
        # on the answer tokens, each layer's experts apart: what a domain expert per layer would show
        "answer_purity": by_layer["layer_experts"]["purity"] if by_layer else None,
        "answer_purity_layers": {k: v["purity"] for k, v in by_layer["layers"].items()} if by_layer else None,
        "split": run.recipe.data.generate.held_out if run.recipe.data.generate else "eval",
        "rows": {"domain": list(columns["domain"]), "nll": row_nll, "tokens": row_tokens, "correct": row_correct},
    }


# ---- statistics -----------------------------------------------------------------------------------

#: Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1 .. 30.
_T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
         2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688,
         2.131449546, 2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845,
         2.073873068, 2.068657610, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
         2.045229642, 2.042272456)
_Z975 = 1.959963985


def t_quantile(df: int) -> float:
    """``t_{0.975, df}``: the table up to 30 degrees of freedom, Hill's expansion beyond (error < 1e-6)."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def t_interval(values: list[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95% t-interval of the mean of ``values`` (half-width NaN for one value)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def paired_differences(variant: dict[int, float], reference: dict[int, float]) -> list[float]:
    """``variant[s] - reference[s]`` for every seed ``s`` both have, in seed order."""
    return [variant[s] - reference[s] for s in sorted(set(variant) & set(reference))]


def bootstrap_interval(runs: list[tuple[list[float], list[float]]], reference: list[tuple[list[float], list[float]]] | None = None,
                       *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the mean over runs of ``sum(values) / sum(weights)`` over the eval rows
    (each run one ``(values, weights)`` per row: NLL sums and token counts, or 0/1 correct and 1),
    minus the same of ``reference[i]`` (run ``i`` paired with ``reference[i]``: the same seed), and
    its 95% percentile interval over ``resamples`` resamplings of the rows (the same rows for every
    run and the reference: a paired bootstrap)."""
    import numpy as np

    def stack(group):
        return np.asarray([r[0] for r in group], dtype=np.float64), np.asarray([r[1] for r in group], dtype=np.float64)

    values, weights = stack(runs)
    n = values.shape[1]
    if reference is not None:
        ref_values, ref_weights = stack(reference)
        if ref_values.shape != values.shape:
            raise ValueError("a paired bootstrap needs the same rows for the variant and the reference")

    def statistic(counts: np.ndarray) -> np.ndarray:  # counts [B, n] -> [B]
        out = (counts @ values.T) / (counts @ weights.T)
        if reference is not None:
            out = out - (counts @ ref_values.T) / (counts @ ref_weights.T)
        return out.mean(axis=1)

    estimate = float(statistic(np.ones((1, n)))[0])
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(np.float64)
    stats = statistic(counts)
    low, high = np.quantile(stats, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return estimate, float(low), float(high)


def excludes_zero(low: float, high: float) -> bool:
    """Whether the interval ``[low, high]`` lies on one side of 0 (a significant difference)."""
    return low == low and high == high and (low > 0 or high < 0)


def difference_cell(variant: dict[int, dict], reference: dict[int, dict], metric: str, spec: str,
                    scale: float = 1.0, min_seeds: int = 3) -> str:
    """``Δ ± half-width`` of ``metric`` (``loss`` or ``accuracy``) paired by seed against the
    reference, ``*`` where the interval excludes 0; with fewer than ``min_seeds`` paired seeds, the
    paired bootstrap over eval rows (marked ``b``) where the rows were recorded."""
    seeds = sorted(s for s in set(variant) & set(reference) if variant[s].get(metric) and reference[s].get(metric))
    if not seeds:
        return "—"
    if len(seeds) < min_seeds and all(variant[s].get("rows") and reference[s].get("rows") for s in seeds):
        pick = (lambda r: (r["rows"]["nll"], r["rows"]["tokens"])) if metric == "loss" else \
               (lambda r: (r["rows"]["correct"], [1] * len(r["rows"]["correct"])))
        estimate, low, high = bootstrap_interval([pick(variant[s]) for s in seeds], [pick(reference[s]) for s in seeds])
        mark = "*" if excludes_zero(low, high) else ""
        return f"{estimate * scale:{spec}} [{low * scale:{spec}}, {high * scale:{spec}}] b{mark}"
    diffs = paired_differences({s: variant[s][metric]["all"] for s in seeds}, {s: reference[s][metric]["all"] for s in seeds})
    mean, half = t_interval(diffs)
    if half != half:
        return f"{mean * scale:{spec}}"
    mark = "*" if excludes_zero(mean - half, mean + half) else ""
    return f"{mean * scale:{spec}} ± {half * scale:{spec.lstrip('+')}}{mark}"


# ---- the table (parent process) ------------------------------------------------------------------

def _fmt(values: list[float | None], spec: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    mean, half = t_interval(values)
    return f"{mean:{spec}}" + (f" ± {half:{spec}}" if half == half else "")


def table(results: list[dict], min_seeds: int = 3) -> str:
    """The markdown table of ``results`` (rows of :func:`run_one`; validation rows of a sweep are left out)."""
    by_recipe: dict[str, dict[int, dict]] = {}
    timing: dict[str, dict[int, dict]] = {}
    for row in results:
        if row.get("split", "eval") != "eval":
            continue
        (timing if row.get("timing") else by_recipe).setdefault(row["recipe"], {})[row["seed"]] = row
    for name in timing:
        by_recipe.setdefault(name, {})
    order = sorted(by_recipe, key=lambda r: (r != REFERENCE, r.split("@")[0] == BASELINE, r))
    reference = by_recipe.get(REFERENCE, {})
    domains = next((list(r["loss"]) for rows in by_recipe.values() for r in rows.values() if r.get("loss")), [])
    domains = [d for d in domains if d != "all"]
    ref_step = _step_time(timing.get(REFERENCE) or ({} if timing else reference))
    head = (["recipe", "seeds", "lr x", "trainable", "eval loss", "Δ loss vs sparse", "accuracy %", "Δ acc % vs sparse",
             "purity", "answer purity", "NMI", "step time"] + [f"loss {d}" for d in domains])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        rows = by_recipe[name]
        quality = [r for r in rows.values() if r.get("loss")]
        # a tagged variant (another learning rate) computes what its recipe does: its recipe's timing
        timed = timing.get(name) or timing.get(name.split("@")[0])
        step = _step_time(timed or rows) if timed or not timing else None
        scales = sorted({r.get("lr_scale", 1.0) for r in rows.values()})
        cells = [
            name + (" (baseline)" if name.split("@")[0] == BASELINE else ""),
            ",".join(str(s) for s in sorted(rows)) or "—",
            ",".join(f"{x:g}" for x in scales) or "—",
            f"{statistics.median(r['trainable'] for r in (rows or timing[name]).values()):,.0f}",
            _fmt([r["loss"]["all"] for r in quality], ".4f"),
            "—" if name == REFERENCE else difference_cell(rows, reference, "loss", "+.4f", min_seeds=min_seeds),
            _fmt([r["accuracy"]["all"] for r in quality], ".1f", 100),
            "—" if name == REFERENCE else difference_cell(rows, reference, "accuracy", "+.1f", 100, min_seeds=min_seeds),
            _fmt([r["purity"] for r in quality], ".3f"),
            _fmt([r.get("answer_purity") for r in quality], ".3f"),
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


def lr_overrides(recipe_path: str, scale: float) -> list[str]:
    """``--set`` overrides that run every phase after a ``base_pretrain`` one at ``scale`` times its
    learning rate (a recipe's phases keep their proportions)."""
    if scale == 1.0:
        return []
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe

    resolved = load_recipe(recipe_path, load_plugins()).resolved
    return [f"phases.{phase['name']}.lr={phase['lr'] * scale:.6g}" for phase in resolved["phases"]
            if phase["trainer"]["name"] != "base_pretrain"]


def choose_lr(results: list[dict], recipe: str) -> float | None:
    """The learning-rate multiplier of ``recipe``'s validation run of lowest loss (None: no sweep)."""
    sweep = [r for r in results if r.get("split") == "validation" and r["recipe"].split("@")[0] == recipe and r.get("loss")]
    if not sweep:
        return None
    return min(sweep, key=lambda r: (r["loss"]["all"], r.get("lr_scale", 1.0)))["lr_scale"]


def sweep_scales(spec: str) -> dict[str | None, list[float]]:
    """``--lr-sweep`` parsed: ``"0.3,1,3"`` -> ``{None: [0.3, 1, 3]}`` (every recipe); an item
    ``STEM:M`` adds ``M`` for that recipe only (``"sparse:10,lora_delta:0.1"`` widens two grids)."""
    scales: dict[str | None, list[float]] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        stem, _, value = item.rpartition(":")
        scales.setdefault(stem or None, []).append(float(value))
    return scales


def lr_scale_of(recipe: str, choice: dict) -> float:
    """The multiplier a table run uses: the recipe's own sweep's, else the reference recipe's (a feature
    of the same sparse experts, trained at the same budget, inherits the rate chosen for ``sparse``)."""
    own = choice.get(Path(recipe).stem)
    return own if own is not None else choice.get(REFERENCE) or 1.0


def _child(recipe: str, seed: int, args, timing: bool, lr_scale: float = 1.0, split: str = "eval") -> dict:
    tag = args.tag or ""
    if split == "validation":
        tag = f"{tag}lr{lr_scale:g}"
    name = Path(recipe).stem + (f"@{tag}" if tag else "")
    out = Path(args.workdir) / "rows" / f"{name}-s{seed}{'-timing' if timing else ''}{'-validation' if split == 'validation' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = ([] if timing else budget_overrides(recipe, args.budget)) + lr_overrides(recipe, lr_scale) + args.overrides
    if split == "validation":
        overrides.append('data.generate.held_out="validation"')
    command = [sys.executable, __file__, "--one", recipe, "--seed", str(seed), "--threads", str(args.threads),
               "--out", str(out), "--tag", tag, "--lr-scale", str(lr_scale)] + [x for o in overrides for x in ("--set", o)]
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
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="tiny",
                        help="the recipes run when none are named: recipes/ablations/ (tiny) or its conventions/ folder")
    parser.add_argument("--lr-sweep", default="",
                        help="comma-separated learning-rate multipliers tried per recipe on the validation split "
                             "(first seed); the table runs at the best (e.g. 0.3,1,3; sparse:10 adds 10 for sparse only)")
    parser.add_argument("--sweep-only", action="store_true", help="run the --lr-sweep and record the choice, no table runs")
    parser.add_argument("--base-cached", action="store_true",
                        help="the base models are cached in --workdir already: start every job at once")
    parser.add_argument("--min-seeds", type=int, default=3,
                        help="paired seeds below which differences use the bootstrap over eval rows (default 3)")
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
    parser.add_argument("--lr-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.one:  # a child: one run
        import torch

        torch.set_num_threads(args.threads or cores)
        row = run_one(args.one, args.seed, args.overrides, evaluate_run=not args.timing, tag=args.tag)
        row["timing"] = args.timing
        row["lr_scale"] = args.lr_scale
        Path(args.out).write_text(json.dumps(row, indent=1))
        return 0

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = str(workdir)
    results_file = workdir / "ablations.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    if not args.table:
        recipes = [str(Path(r).resolve()) for r in args.recipes] or [str(p) for p in sorted(SUITES[args.suite].glob("*.toml"))]
        jobs = 1 if args.timing else max(1, args.jobs)
        args.threads = args.threads or max(1, cores // jobs)
        seeds = [0] if args.timing else [int(s) for s in args.seeds.split(",") if s.strip()]
        print(f"{platform.processor() or platform.machine()}, {cores} cores: {len(recipes)} recipes x seeds {seeds}, "
              f"{jobs} job(s) x {args.threads} thread(s), in {workdir}", flush=True)
        # the reference recipe first (timing: it is the unit) and alone (it trains and caches the shared base)
        recipes.sort(key=lambda r: Path(r).stem != REFERENCE)
        def key(r):
            return r["recipe"], r["seed"], r.get("timing", False), r.get("split", "eval")

        def run_all(todo):  # the first job alone (it trains and caches the shared base), then the rest
            alone = todo[:0] if args.base_cached else todo[:1]
            new = [_child(job[0], job[1], args, args.timing, *job[2:]) for job in alone]
            with ThreadPoolExecutor(jobs) as pool:
                new += list(pool.map(lambda job: _child(job[0], job[1], args, args.timing, *job[2:]), todo[len(alone):]))
            return [r for r in new if r]

        scales = sweep_scales(args.lr_sweep)
        if scales and not args.timing:
            tuned = [r for r in recipes if lr_overrides(r, 2.0)]  # the base alone has no learning rate to pick
            sweep = run_all([(r, seeds[0], m, "validation") for r in tuned for m in scales.get(Path(r).stem, scales.get(None, []))])
            fresh = {key(r) for r in sweep}
            results = [r for r in results if key(r) not in fresh] + sweep
            saved = workdir / "lr_choice.json"  # earlier sweeps' choices stay; this sweep's recipes are re-chosen
            choice = json.loads(saved.read_text()) if saved.is_file() else {}
            choice |= {Path(r).stem: choose_lr(results, Path(r).stem) for r in tuned}
            saved.write_text(json.dumps(choice, indent=1))
            print("learning-rate multipliers chosen on the validation split: "
                  + ", ".join(f"{k} x{v:g}" for k, v in choice.items() if v is not None), flush=True)
            if args.sweep_only:
                results_file.write_text(json.dumps(results, indent=1))
                recipes = []
        else:
            saved = workdir / "lr_choice.json"
            choice = json.loads(saved.read_text()) if saved.is_file() and not args.timing else {}
        new = run_all([(r, s, lr_scale_of(r, choice), "eval") for r in recipes for s in seeds])
        fresh = {key(r) for r in new}
        results = [r for r in results if key(r) not in fresh] + new
        results_file.write_text(json.dumps(results, indent=1))
    text = table(results, args.min_seeds)
    (workdir / "ablations.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    raise SystemExit(main())
