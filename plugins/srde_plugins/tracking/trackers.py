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
