"""Experiment trackers: TensorBoard and Weights & Biases (offline or online), off by default.

    [plugins.tensorboard]
    enabled = true                 # event files in RUN_DIR/tensorboard (or log_dir)

    [plugins.wandb]
    enabled = true
    project = "srde"
    mode = "offline"               # offline (RUN_DIR/wandb, sync later with `wandb sync`), online, disabled

Every logged step's numbers go to the tracker under ``<phase>/<metric>`` (losses and their parts, LR,
grad norm, router load and entropy, density, tokens/s), on the main process only. At the end of the
run, each SRDE layer's expert x domain routing on the eval rows goes to the tracker as an image
(``eval/routing_layer<L>``; needs matplotlib). A tracker that fails
to start stops the run with one line, unless ``on_error = "continue"``, which warns once and goes on.

``srde eval`` and a run's loss summary print the tables of the ``report`` component ``tables``
(:mod:`srde_plugins.tracking.tables`). ``srde eval RUN_DIR --plots`` writes the components of the ``plots`` kind (declared here): the
built-in ``png`` makes PNG figures in ``RUN_DIR/plots/`` (:mod:`srde_plugins.tracking.plots`).

``srde lm-eval RUN_DIR --tasks T[,T]`` (added here through ``srde_add_commands``) scores a run with
EleutherAI's lm-evaluation-harness (:mod:`srde_plugins.tracking.harness`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params
from srde_core.registry import CALLABLE


class TrackerParams(Params):
    enabled: bool = Field(False, description="turn the tracker on")
    on_error: Literal["stop", "continue"] = Field(
        "stop", description="a tracker that fails to start: stop the run (one line) or warn and go on"
    )


class TensorBoardParams(TrackerParams):
    log_dir: str | None = Field(None, description="event file directory (default: RUN_DIR/tensorboard)")


class WandbParams(TrackerParams):
    project: str = Field("srde", min_length=1, description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline writes RUN_DIR/wandb")
    tags: list[str] = Field(default_factory=list, description="run tags")


@hookimpl
def srde_add_kinds(kinds):
    kinds.add("plots", "Figures of a finished run (`srde eval --plots`): (run_dir, evaluation) -> written paths.",
              contract=CALLABLE)


@hookimpl
def srde_add_commands(subparsers):
    from srde_plugins.tracking.commands import add_lm_eval

    add_lm_eval(subparsers)


@hookimpl
def srde_register(registry):
    registry.add("report", "tables", "srde_plugins.tracking.tables:tables", NoParams,
                 "The eval tables: loss and answer accuracy per domain (base vs SRDE), expert x domain load, purity per layer.")
    registry.add("plots", "png", "srde_plugins.tracking.plots:writer", NoParams,
                 "PNG figures in RUN_DIR/plots: training curves, routing heatmaps, router load, density, curriculum.")
    registry.settings("tensorboard", TensorBoardParams, "TensorBoard event files of every logged step.")
    registry.settings("wandb", WandbParams, "Weights & Biases run (offline by default) of every logged step.")


def _trackers(run):
    from srde_plugins.tracking.trackers import trackers_of

    return trackers_of(run)


@hookimpl
def srde_before_phase(phase, run):
    _trackers(run)  # start before the first step: a tracker that cannot start stops the run early


@hookimpl
def srde_after_step(phase, run, step, metrics):
    for tracker in _trackers(run):
        tracker.log(phase.name, step, metrics)


@hookimpl
def srde_after_run(run):
    trackers = _trackers(run)
    if trackers:
        from srde_plugins.tracking.trackers import log_routing_images

        log_routing_images(run, trackers)
    for tracker in trackers:
        tracker.close()
