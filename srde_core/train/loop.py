"""The one training loop every trainer uses.

A trainer decides *what* trains (which module state, which parameters) and *how the loss is
computed*; this loop does the rest: micro-batches and gradient accumulation through the engine,
metrics, progress, checkpoints and exact resumption.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from srde_core.train.checkpoints import restore_rng, rng_state
from srde_core.train.progress import PhaseProgress

LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainingTarget:
    """What a phase trains: the model, its trainable parameters, how to save/restore their state."""

    model: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    get_state: Callable[[], dict[str, torch.Tensor]]
    set_state: Callable[[dict[str, torch.Tensor]], None]


def batch_for_step(run, phase, micro_step: int) -> dict[str, torch.Tensor]:
    """The collated micro-batch number ``micro_step`` of ``phase`` (order from the hook)."""
    from srde_core.data.dataset import collate

    dataset = run.data.train
    indices = run.hook.srde_batch_indices(
        dataset=dataset, phase=phase, step=micro_step, batch_size=phase.batch_size, seed=run.recipe.seed
    )
    rows = dataset.select(indices)
    batch = collate(rows, pad_id=run.tokenizer.pad_id, loss_on=run.recipe.data.loss_on, domains=run.data.domains)
    return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


def train(run, phase, target: TrainingTarget, loss_fn: LossFn) -> dict[str, Any]:
    """Train ``target`` for ``phase.steps`` optimiser steps; resume from a checkpoint if asked."""
    engine = run.hook.srde_training_engine(model=target.model, parameters=target.parameters, phase=phase, run=run)
    start = 0
    last: dict[str, Any] = {}
    checkpoint = run.checkpoints.latest(phase.name) if run.resume else None
    if checkpoint is not None:
        module_state, state = checkpoint.load()
        target.set_state(module_state)
        engine.load_state_dict(state["engine"])
        restore_rng(state["rng"])
        run.hook.srde_checkpoint_loaded(state=state, run=run)
        run.metrics.truncate_after(phase.name, checkpoint.step)
        start, last = checkpoint.step, state.get("metrics", {})
        run.log(f"{phase.name}: resumed from {checkpoint.path.name}")
        if start >= phase.steps:
            return last

    target.model.train()
    started = time.perf_counter()
    tokens = 0
    with PhaseProgress(run.console, phase.name, start, phase.steps) as progress:
        for step in range(start, phase.steps):
            sums: dict[str, float] = {}
            for micro in range(phase.grad_accum):
                batch = batch_for_step(run, phase, step * phase.grad_accum + micro)
                with engine.autocast():
                    loss, parts = loss_fn(batch)
                engine.backward(loss / phase.grad_accum)
                for key, value in {"loss": float(loss.detach()), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value / phase.grad_accum
                tokens += int(batch["attention_mask"].sum())
            stats = engine.step()
            elapsed = time.perf_counter() - started
            done = step + 1
            metrics = {"phase": phase.name, "step": done, **sums, **stats, "tokens_per_s": tokens / max(elapsed, 1e-9)}
            run.hook.srde_after_step(phase=phase, run=run, step=done, metrics=metrics)
            eta = elapsed / (done - start) * (phase.steps - done)
            if done % phase.log_every == 0 or done == phase.steps:
                run.metrics.write(metrics)
                progress.update(done, metrics, eta)
            else:
                progress.update(done, None, eta)
            last = metrics
            if done == phase.steps or (phase.checkpoint_every and done % phase.checkpoint_every == 0):
                state = {"engine": engine.state_dict(), "rng": rng_state(), "metrics": metrics, "plugins": {}}
                run.hook.srde_checkpoint_saving(state=state, run=run)
                run.checkpoints.save(
                    phase.name, done, target.get_state(), state, keep=phase.keep_checkpoints, final_step=phase.steps
                )
    return last
