"""The ``base_pretrain`` trainer (registered by :mod:`srde_plugins.trainers`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from srde_core.errors import RecipeError, SRDEError
from srde_core.run import resumed_on_the_same_data, seed_everything
from srde_core.train.checkpoints import save_tensors
from srde_core.train.driver import TrainingTarget, drive
from srde_core.train.objective import Objective, supervised_step
from srde_core.train.trainer import BaseInfo, PhaseResult, Trainer


#: Phase keys that change nothing the phase trains (a base trained with other values is the same base).
COSMETIC = ("log_every", "checkpoint_every", "keep_checkpoints")


def base_key(run, phase) -> str:
    """The cache key of a trained base: model, tokenizer, data, data settings, phase and seed, and
    what changes the trained weights besides: the engine and its settings, the process count (the
    global batch, the reduction order), the device type and the autocast dtype on it."""
    from srde_core.train.engine import autocast_dtype

    recipe = run.recipe.resolved
    device = torch.device(run.device)
    ingredients = {
        "engine": recipe["engine"],
        "processes": run.dist.world_size,
        "device": device.type,
        "precision": str(autocast_dtype(phase.precision, device)),
        "model": recipe["model"],
        "tokenizer": run.tokenizer.fingerprint,
        "data": run.data.fingerprint,
        "data_settings": recipe["data"],  # loss_on, seq_len, ... change what the base learns
        # how often it logs and checkpoints does not change the weights
        "phase": {k: v for k, v in recipe["phases"][phase.index].items() if k not in COSMETIC},
        "seed": run.recipe.base_model_seed,
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:16]


class BasePretrain(Trainer):
    """Dense pre-training of the whole base model (the embedded tiny base); cached across runs."""

    def __init__(self, params):
        self.params = params

    def run(self, run, phase) -> PhaseResult:
        result = self._train_or_load(run, phase)
        if run.recipe.base_seed not in (None, run.recipe.seed):
            # the phases after the base draw from the run's own seed, whether the base was cached or trained
            seed_everything(run.recipe.seed)
        return result

    def _train_or_load(self, run, phase) -> PhaseResult:
        if run.experts is not None:
            raise RecipeError(
                "base_pretrain must come before the phases that train experts",
                source=str(run.recipe.path), key=f"phases[{phase.index}].trainer",
            )
        key = base_key(run, phase)
        base_id = f"{run.recipe.model.architecture}:pretrained-{key}"
        cached = Path(run.recipe.cache_dir) / "base" / key / "model.safetensors"
        if self.params.cache and cached.is_file():
            run.model.load_state_dict(load_file(cached, device=str(run.device)))
            run.log(f"{phase.name}: base loaded from cache {cached.parent}")
            return PhaseResult({}, BaseInfo(base_id, str(cached.resolve())))
        model = run.model
        for p in model.parameters():
            p.requires_grad_(True)
        target = TrainingTarget(
            model=model,
            parameters=list(model.parameters()),
            get_state=model.state_dict,
            set_state=lambda state: model.load_state_dict(state),
        )
        objective = Objective(run, phase, model)
        result = drive(run, phase, target, supervised_step(objective), state=objective.schedules,
                       seed=run.recipe.base_model_seed)
        with run.engine.full_state(model) as state:  # gathered where an engine partitions the weights
            broken = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if broken:  # never cache (or keep) a broken base
                raise SRDEError(f"phase '{phase.name}': the trained base holds non-finite weights ({broken[0]}"
                                f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); not saved",
                                source=str(run.run_dir))
            # Without the cache the weights stay with the run, so `srde eval` can rebuild the model. A
            # resumed run whose data the run directory does not vouch for keeps them too: the cache key
            # names the current data, and the checkpoints may hold training on other data.
            shared = self.params.cache and (not run.resume or resumed_on_the_same_data(run))
            final = cached if shared else run.run_dir / "base" / "model.safetensors"
            if run.dist.is_main:
                tmp = final.parent.with_name(f".tmp-{final.parent.name}-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save_tensors(state, tmp / "model.safetensors")
                shutil.rmtree(final.parent, ignore_errors=True)
                os.replace(tmp, final.parent)
        run.dist.barrier()
        run.log(f"{phase.name}: base saved to {final.parent}")
        return PhaseResult(dict(result or {}), BaseInfo(base_id, str(final.resolve())))
