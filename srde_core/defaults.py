"""The core's own hook implementations: the defaults that plugins may override.

Registered before any plugin (as ``srde-core``) and marked ``trylast``, so a plugin's
``firstresult`` implementation wins over these.
"""

from __future__ import annotations

import random
from functools import lru_cache

from srde_core.hookspecs import hookimpl


@lru_cache(maxsize=4)
def _epoch_order(seed: int, phase_name: str, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:{phase_name}:{epoch}").shuffle(order)
    return tuple(order)


@hookimpl(trylast=True)
def srde_batch_indices(dataset, phase, step, batch_size, seed):
    """Epoch-wise shuffled order: micro-batch ``step`` of a permutation reshuffled every epoch.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """
    n = len(dataset)
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n)
        order = _epoch_order(seed, phase.name, epoch, n)
        take = min(batch_size - len(indices), n - offset)
        indices.extend(order[offset : offset + take])
    return indices


@hookimpl(trylast=True)
def srde_training_engine(model, parameters, phase, run):
    """The plain PyTorch engine (AdamW + the phase's LR schedule)."""
    from srde_core.train.engine import TorchEngine

    schedule = run.build(phase.scheduler, total_steps=phase.steps)
    return TorchEngine(
        parameters,
        lr=phase.lr,
        weight_decay=phase.weight_decay,
        betas=(phase.beta1, phase.beta2),
        max_grad_norm=phase.max_grad_norm,
        schedule=schedule,
        device=run.device,
        precision=phase.precision,
    )
