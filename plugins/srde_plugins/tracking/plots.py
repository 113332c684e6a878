"""Plots of a run (``srde eval RUN_DIR --plots``): PNGs in ``RUN_DIR/plots/``, made with matplotlib.

- ``training_<phase>.png``: the loss and its parts per logged step, one figure per phase;
- ``routing_layer<L>.png``: each SRDE layer's expert x domain routing (share of each expert's slots);
- ``router_load.png``: the busiest expert's share of slots and the routing entropy over training;
- ``density.png`` / ``curriculum.png``: the density schedule or the curriculum's competence, for
  runs that log them.
Every figure has labelled axes and a title naming the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from srde_core.errors import SRDEError

PLOTS_DIR = "plots"
_LOSS_KEYS_SKIPPED = {"step", "lr", "grad_norm", "tokens_per_s", "router_max_load", "router_entropy", "density",
                      "density_in_use", "competence"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise SRDEError("plots need matplotlib: pip install 'srde[plots]'") from None
    return plt


def _series(metrics: list[dict[str, Any]], phase: str, key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in metrics if m.get("phase") == phase and isinstance(m.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def write_plots(run_dir: str | Path, name: str, metrics: list[dict[str, Any]], evaluation: dict | None) -> list[Path]:
    """Write the run's figures into ``run_dir/plots``; return their paths."""
    plt = _pyplot()
    out = Path(run_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, filename: str) -> None:
        path = out / filename
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    phases = list(dict.fromkeys(m["phase"] for m in metrics if "phase" in m))
    for phase in phases:
        keys = sorted({k for m in metrics if m.get("phase") == phase for k, v in m.items()
                       if isinstance(v, (int, float)) and k not in _LOSS_KEYS_SKIPPED and not k.endswith("_weight")})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            ax.plot(*_series(metrics, phase, key), label=key, linewidth=1.5 if key == "loss" else 1.0)
        ax.set(xlabel="optimiser step", ylabel="loss", title=f"{name}: training losses, phase '{phase}'")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, f"training_{phase}.png")

    routed = [p for p in phases if _series(metrics, p, "router_max_load")[0]]
    if routed:
        fig, (load_ax, entropy_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for phase in routed:
            load_ax.plot(*_series(metrics, phase, "router_max_load"), label=phase)
            entropy_ax.plot(*_series(metrics, phase, "router_entropy"), label=phase)
        load_ax.set(xlabel="optimiser step", ylabel="busiest expert's share of slots", title=f"{name}: router load")
        entropy_ax.set(xlabel="optimiser step", ylabel="routing entropy (nats)", title=f"{name}: routing entropy")
        for ax in (load_ax, entropy_ax):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        save(fig, "router_load.png")

    for key, filename, label in (("density", "density.png", "density (fraction of weight entries)"),
                                 ("competence", "curriculum.png", "curriculum competence (easiest fraction)")):
        with_key = [p for p in phases if _series(metrics, p, key)[0]]
        if with_key:
            fig, ax = plt.subplots(figsize=(7, 4))
            for phase in with_key:
                ax.plot(*_series(metrics, phase, key), label=phase)
            ax.set(xlabel="optimiser step", ylabel=label, title=f"{name}: {key} over training")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            save(fig, filename)

    routing = (evaluation or {}).get("routing") or {}
    for layer, summary in sorted(routing.get("layers", {}).items(), key=lambda kv: int(kv[0])):
        save(routing_figure(summary["counts"], summary["domains"], f"{name}: layer {layer} routing (purity {summary['purity']:.2f})"),
             f"routing_layer{layer}.png")
    return written


def routing_figure(counts: list[list[int]], domains: list[str], title: str):
    """The expert x domain heatmap of one layer: each expert's slots by domain, as shares."""
    plt = _pyplot()
    shares = [[c / max(1, sum(row)) for c in row] for row in counts]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(domains), 1.2 + 0.5 * len(counts)))
    image = ax.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(counts)), [f"expert {e}" for e in range(len(counts))])
    ax.set(xlabel="domain", ylabel="expert", title=title)
    fig.colorbar(image, ax=ax, label="share of the expert's slots")
    fig.tight_layout()
    return fig


def plots_for_run(run_dir: str | Path, evaluation: dict | None) -> list[Path]:
    """The figures of a finished run from its ``metrics.jsonl`` and the evaluation just made."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    metrics = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a partial last line of a killed run
    recipe = json.loads((run_dir / "recipe.json").read_text()).get("recipe", {})
    return write_plots(run_dir, recipe.get("name", run_dir.name), metrics, evaluation)


def writer(params=None):
    """The ``plots`` component ``png``: :func:`plots_for_run`."""
    return plots_for_run
