"""The trackers of one run (see :mod:`srde_plugins.tracking`), made on the first logged step."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from srde_core.errors import SRDEError


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "step"}


class TensorBoardTracker:
    def __init__(self, run, settings):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(settings.log_dir) if settings.log_dir else run.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.offsets: dict[str, int] = {}

    def log(self, phase: str, step: int, metrics: dict[str, Any]) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(f"{phase}/{key}", value, global_step=step)

    def image(self, tag: str, figure) -> None:
        self.writer.add_figure(tag, figure)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    def __init__(self, run, settings):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, mode=settings.mode, tags=settings.tags,
            name=run.recipe.name, dir=str(run.run_dir), config=run.recipe.resolved,
            reinit="finish_previous",
        )

    def log(self, phase: str, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({f"{phase}/{k}": v for k, v in scalars(metrics).items()} | {f"{phase}/step": step})

    def image(self, tag: str, figure) -> None:
        self.run.log({tag: self.wandb.Image(figure)})

    def close(self) -> None:
        self.run.finish()


MAKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def trackers_of(run) -> list:
    """The run's started trackers (main process only; started on first use)."""
    if not run.dist.is_main:
        return []
    return run.plugin_state("tracking", lambda: _start(run))


def _start(run) -> list:
    started = []
    for name, make in MAKERS.items():
        settings = run.recipe.settings(name)
        if not settings.enabled:
            continue
        try:
            started.append(make(run, settings))
        except Exception as err:  # an import error, a bad directory, a service that refuses
            line = f"tracker '{name}' failed to start: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
            if settings.on_error == "stop":
                raise SRDEError(line, key=f"plugins.{name}") from None
            run.log(f"warning: {line}; the run goes on without it")
    return started


def log_routing_images(run, trackers) -> None:
    """Each SRDE layer's expert x domain routing on the run's eval rows, as a tracker image."""
    if run.experts is None or run.data is None or run.data.eval is None or len(run.data.eval) == 0:
        return
    try:
        from srde_plugins.tracking.plots import routing_figure
    except SRDEError as err:  # matplotlib missing
        run.log(f"trackers: no routing images ({err.message})")
        return
    from srde_core.evaluate import evaluation_state
    from srde_core.evaluate.losses import domain_losses, eval_batches, eval_subset
    from srde_core.evaluate.routing import RoutingCounter, summarize

    domains = run.data.domains
    rows = eval_subset(run.data.eval, domains, run.recipe.eval.max_examples_per_domain)
    batches = eval_batches(rows, pad_id=run.tokenizer.pad_id, loss_on=run.recipe.data.loss_on, domains=domains,
                           batch_size=run.recipe.eval.batch_size)
    counter = RoutingCounter(run.experts.layers, len(domains))
    with evaluation_state(run.model, run.experts, enabled=True):
        domain_losses(run.model, batches, domains, device=run.device, experts=run.experts, after_forward=counter.observe)
    import matplotlib.pyplot as plt

    for layer, counts in sorted(counter.counts.items()):
        summary = summarize(counts, domains)
        figure = routing_figure(summary["counts"], domains, f"{run.recipe.name}: layer {layer} routing (purity {summary['purity']:.2f})")
        for tracker in trackers:
            tracker.image(f"eval/routing_layer{layer}", figure)
        plt.close(figure)
