"""Per-example scores of the training set under the base model, computed once and cached (the
``curriculum`` sampler's ``difficulty = "base_loss"``).

A component that needs a number per training example that only the model can give (a curriculum's
difficulty as the base model's loss, a filter's perplexity) asks for it with
:func:`base_example_scores`: the run evaluates ``score(model, batch)`` over the whole training set
with the experts off, the model in eval mode and no gradients, in batches, with a progress bar.
The result is saved as ``cache_dir/scores/<name>-<key>.npy``, where the key covers ``name``, the
caller's ``settings``, the data fingerprint and :func:`base_fingerprint`; a later run (a resumed one
included) with the same inputs reads it back instead of computing it, so the scores are the same
numbers every time. Under several processes each computes a strided share of the rows and the
shares are summed into one vector every process holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ScoreFn = Callable[[Any, dict[str, Any]], Any]  # (model, batch on the run's device) -> [B] tensor


def base_fingerprint(run) -> str:
    """Identifies the base weights a run's model holds now: the base id (a checkpoint name, or a
    trained base's cache key), the recipe's ``[model]`` table (config, dtype) and, for a base
    initialised at random from its config, the seed it was initialised with."""
    material: dict[str, Any] = {"id": run.base.id, "model": run.recipe.resolved["model"]}
    if not run.recipe.model.name_or_path and not run.base.weights:
        material["seed"] = run.recipe.base_model_seed
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def scores_path(run, name: str, settings: Mapping[str, Any]) -> Path:
    """Where :func:`base_example_scores` keeps the scores ``name`` for this run's data and base."""
    material = {"name": name, "settings": dict(settings), "data": run.data.fingerprint, "base": base_fingerprint(run)}
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
    return Path(run.recipe.cache_dir) / "scores" / f"{name}-{key}.npy"


def base_example_scores(run, name: str, score: ScoreFn, *, settings: Mapping[str, Any], batch_size: int) -> list[float]:
    """``score`` of every training example (in ``run.data.train`` order) under the base model.

    ``score(model, batch)`` gets a collated batch (``input_ids``, ``attention_mask``, ``labels``
    per the recipe's ``loss_on``, ``domain_ids``) on the run's device and returns one number per
    row. ``settings`` names whatever else the numbers depend on (part of the cache key).
    """
    import numpy as np

    path = scores_path(run, name, settings)
    cached = run.dist.broadcast(_read(path) if run.dist.is_main else None)
    if cached is not None and len(cached) == len(run.data.train):
        run.log(f"{name}: per-example scores read from {path}")
        return [float(x) for x in cached]
    run.log(f"{name}: scoring {len(run.data.train)} training examples under the base model")
    values = _compute(run, name, score, batch_size)
    if run.dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(values, dtype=np.float64))
        os.replace(tmp, path)
        run.log(f"{name}: per-example scores of {len(values)} examples saved to {path}")
    return values


def _read(path: Path) -> list[float] | None:
    """The cached scores, or None when there are none (or the file is damaged: computed again)."""
    import numpy as np

    try:
        return np.load(path).tolist()
    except (OSError, ValueError, EOFError):
        return None


def _compute(run, name: str, score: ScoreFn, batch_size: int) -> list[float]:
    import torch
    from rich.progress import Progress

    from srde_core.data.collate import collate
    from srde_core.evaluate import evaluation_state

    dist, data = run.dist, run.data.train
    n = len(data)
    mine = list(range(dist.rank, n, dist.world_size))
    # Every process runs the same number of forwards (sharded engines gather weights in each).
    batches = math.ceil(math.ceil(n / dist.world_size) / batch_size)
    totals = torch.zeros(n, dtype=torch.float64, device=run.device)
    with evaluation_state(run.model, run.experts, enabled=False), \
            Progress(console=run.console, transient=True, disable=not (dist.is_main and run.console.is_terminal)) as bar:
        task = bar.add_task(f"{name} (base model, {n} examples)", total=batches)
        for b in range(batches):
            rows = mine[b * batch_size:(b + 1) * batch_size]
            picked = rows or [0]  # a process out of rows runs one row, whose score it drops
            batch = collate(data.select(picked), run.tokenizer.pad_id, run.recipe.data.loss_on, run.data.domains)
            values = score(run.model, {k: v.to(run.device) for k, v in batch.items()})
            if rows:
                totals[torch.tensor(rows, device=run.device)] = values.detach().to(torch.float64)
            bar.advance(task)
    return [float(x) for x in dist.all_sum(totals).cpu().tolist()]
