"""The step driver: the part of training every trainer shares.

A trainer says *what* trains (a :class:`TrainingTarget`) and *what one optimiser step is* (a step
function); :func:`drive` does the rest: the engine session from the phase's optimiser spec, exact
resume (engine state, RNG of every process, schedule and plugin state, data position), the batches
of each step (from the phase's sampler, sharded over processes), metrics (averaged over processes,
written by the main process), progress, checkpoints and the ``srde_after_step`` hook.

A supervised step is :func:`srde_core.train.supervised.supervised_step`; Phase 1 expert
pre-training and PPO supply their own (rollout, reward, several optimiser steps per step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from srde_core.data.sampler import shard
from srde_core.train.checkpoints import restore_rng
from srde_core.train.metrics import strict
from srde_core.train.engine import EngineSession, OptimizerSpec
from srde_core.train.progress import PhaseProgress


@dataclass
class TrainingTarget:
    """What a phase trains: the model, its trainable parameters, how to save/restore their state."""

    model: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    get_state: Callable[[], dict[str, torch.Tensor]]
    set_state: Callable[[dict[str, torch.Tensor]], None]

    @classmethod
    def of(cls, model: torch.nn.Module, named: dict[str, torch.nn.Parameter]) -> TrainingTarget:
        """Train ``named`` (the model's own parameters, by name); their values are the state."""
        return cls(
            model=model,
            parameters=list(named.values()),
            get_state=lambda: {name: p.detach() for name, p in named.items()},
            set_state=lambda state: [named[name].data.copy_(value) for name, value in state.items()],
        )


class Batches:
    """This process's micro-batches of a phase: micro-batch ``i`` is its share of global micro-batch
    ``i`` (``phase.batch_size`` examples per process) from the phase's sampler (prepared here)."""

    def __init__(self, run: Any, phase: Any, seed: int | None = None):
        self.run = run
        self.phase = phase
        self.seed = run.recipe.seed if seed is None else seed
        self.sampler = phase.sampler.build()
        self.sampler.prepare(run, phase)

    def indices(self, micro_step: int) -> list[int]:
        dist = self.run.dist
        global_batch = self.sampler.indices(
            self.run.data.train, self.phase, micro_step, self.phase.batch_size * dist.world_size, self.seed
        )
        return shard(list(global_batch), dist.rank, dist.world_size)

    def sampler_metrics(self, step: int) -> dict[str, float]:
        """What the sampler logs for optimiser step ``step`` (0-based)."""
        accum, world = self.phase.grad_accum, self.run.dist.world_size
        return self.sampler.metrics(step * accum, self.phase.batch_size * world, len(self.run.data.train))

    def get(self, micro_step: int) -> dict[str, torch.Tensor]:
        from srde_core.data.collate import collate

        run = self.run
        rows = run.data.train.select(self.indices(micro_step))
        batch = collate(rows, pad_id=run.tokenizer.pad_id, loss_on=run.recipe.data.loss_on, domains=run.data.domains)
        return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


@dataclass
class StepContext:
    """What a step function gets: the 0-based optimiser ``step``, the engine ``session``, and the
    phase's batches."""

    run: Any
    phase: Any
    step: int
    session: EngineSession
    batches: Batches

    def micro_batches(self) -> Iterator[tuple[bool, dict[str, torch.Tensor]]]:
        """``(last, batch)`` for each of this step's ``grad_accum`` micro-batches."""
        accum = self.phase.grad_accum
        for micro in range(accum):
            yield micro == accum - 1, self.batches.get(self.step * accum + micro)


StepFn = Callable[[StepContext], dict[str, Any]]


def drive(
    run: Any,
    phase: Any,
    target: TrainingTarget,
    step_fn: StepFn,
    *,
    state: Mapping[str, Any] | None = None,
    updates_per_step: int = 1,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run ``phase.steps`` optimiser steps of ``step_fn``; resume from the latest checkpoint if asked.

    ``step_fn`` returns the step's metrics (``loss`` and parts, ``lr``, ``grad_norm``, ...).
    ``state`` names objects with ``state_dict``/``load_state_dict`` (scalar schedules, samplers
    with state) that are checkpointed with the phase; those with ``observe(step, metrics)`` see
    every step's metrics. ``updates_per_step``: optimiser updates ``step_fn`` makes per step (the LR
    schedule spans them all). ``seed``: the seed of the phase's data order (default: the run's).
    """
    state = dict(state or {})
    dist = run.dist
    session = run.engine.start(target, OptimizerSpec.from_phase(phase, updates_per_step), run)
    if run.experts is not None:
        run.experts.add_remap_listener(session.remap)
    try:
        return _drive(run, phase, target, step_fn, state, session, seed)
    finally:
        if run.experts is not None:
            run.experts.remove_remap_listener(session.remap)
        session.close()
        dist.barrier()


def _drive(run, phase, target, step_fn, state, session, seed) -> dict[str, Any]:
    dist = run.dist
    start = 0
    last: dict[str, Any] = {}

    def load(checkpoint):
        trainer_state, rng = checkpoint.load(dist.rank)
        session.load(checkpoint.path)
        return trainer_state, rng

    # The newest intact checkpoint (a damaged one is passed over, and the log says so).
    checkpoint, loaded = run.checkpoints.load_intact(phase.name, load, dist=dist, log=run.log) if run.resume else (None, None)
    if checkpoint is None and run.resume and dist.is_main:
        run.metrics.truncate_after(phase.name, 0)  # killed before its first checkpoint: the phase starts over
    if checkpoint is not None:
        trainer_state, rng = loaded
        if rng is not None:
            restore_rng(rng)
        for name, obj in state.items():
            if name in trainer_state.get("state", {}):
                obj.load_state_dict(trainer_state["state"][name])
        run.hook.srde_checkpoint_loaded(state=trainer_state, run=run)
        if dist.is_main:
            run.metrics.truncate_after(phase.name, checkpoint.step)
        start, last = checkpoint.step, trainer_state.get("metrics", {})
        run.log(f"{phase.name}: resumed from {checkpoint.path.name}")
        if start >= phase.steps:
            return last

    batches = Batches(run, phase, seed)
    target.model.train()
    started = time.perf_counter()
    tokens = 0.0
    observers = [obj for obj in state.values() if hasattr(obj, "observe")]
    skipping = getattr(phase, "on_nonfinite", "stop") == "skip"
    skipped_steps = int(last.get("skipped_steps") or 0)
    with PhaseProgress(run.console, phase.name, start, phase.steps, enabled=dist.is_main) as progress:
        for step in range(start, phase.steps):
            local = step_fn(StepContext(run, phase, step, session, batches))
            metrics = dist.mean_metrics(local)
            tokens += float(metrics.pop("tokens", 0.0)) * dist.world_size
            elapsed = time.perf_counter() - started
            done = step + 1
            skipped = bool(metrics.get("skipped"))
            if not skipped:
                check_finite(run, phase, done, metrics)
            metrics = {"phase": phase.name, "step": done, **metrics, "tokens_per_s": tokens / max(elapsed, 1e-9),
                       **batches.sampler_metrics(step)}
            if skipping:
                skipped_steps += skipped
                metrics["skipped_steps"] = skipped_steps
            if skipped:  # observers and plugins see None where the step had no finite value
                metrics = strict(metrics)
                run.log(f"{phase.name}: step {done}: non-finite loss or gradient; update skipped ({skipped_steps} so far)")
            for obj in observers:
                obj.observe(done, metrics)
            if getattr(run, "experts", None) is not None:  # learned selectors may move their entries
                run.experts.step_selectors(done, phase.steps, dist)
            run.hook.srde_after_step(phase=phase, run=run, step=done, metrics=metrics)
            eta = elapsed / (done - start) * (phase.steps - done)
            logged = done % phase.log_every == 0 or done == phase.steps
            if logged and dist.is_main:
                run.metrics.write(metrics)
            progress.update(done, metrics if logged and not skipped else None, eta)
            last = metrics
            if done == phase.steps or (phase.checkpoint_every and done % phase.checkpoint_every == 0):
                trainer_state = {
                    "metrics": metrics,
                    "state": {name: obj.state_dict() for name, obj in state.items()},
                    "plugins": {},
                }
                run.hook.srde_checkpoint_saving(state=trainer_state, run=run)
                run.checkpoints.save(
                    phase.name, done, lambda directory: session.save(directory, is_main=dist.is_main), trainer_state,
                    keep=phase.keep_checkpoints, final_step=phase.steps, dist=dist,
                )
    return last


def check_finite(run: Any, phase: Any, step: int, metrics: Mapping[str, Any]) -> None:
    """Stop the run (one line naming the phase and the step) when a step's loss or gradient norm
    (averaged over processes, so every process agrees) is NaN or infinite: nothing of that step is
    logged, checkpointed or exported. A step that the step function skipped
    (``on_nonfinite = "skip"``) reports ``skipped`` instead and is not checked."""
    from srde_core.errors import SRDEError

    for key in ("loss", "grad_norm"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            where = f"phases[{phase.index}]" if hasattr(phase, "index") else "the phase"
            if getattr(phase, "on_nonfinite", "stop") == "skip":
                hint = f"trainer '{phase.trainer.name}' cannot skip a step ({where}.on_nonfinite = \"skip\" covers supervised steps)"
            else:
                hint = f"{where}.on_nonfinite = \"skip\" skips such steps instead"
            raise SRDEError(
                f"phase '{phase.name}', step {step}: non-finite {key.replace('_', ' ')} ({value}); stopped, nothing "
                f"of this step was saved; {hint}",
                source=str(run.run_dir),
            )
