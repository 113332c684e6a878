"""Trainers: dense base pre-training (cached) and joint SRDE training on the frozen base."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pydantic import Field

from srde_core.errors import RecipeError
from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class BasePretrainParams(Params):
    cache: bool = Field(
        True, description="reuse a base trained before with the same model, tokenizer, data, phase and seed"
    )


def _base_key(run, phase) -> str:
    recipe = run.recipe.resolved
    ingredients = {
        "model": recipe["model"],
        "tokenizer": run.tokenizer.fingerprint,
        "data": run.data.fingerprint,
        "data_settings": recipe["data"],  # loss_on, seq_len, ... change what the base learns
        "phase": recipe["phases"][phase.index],
        "seed": run.recipe.seed,
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:16]


class BasePretrain:
    """Dense pre-training of the whole base model (the embedded tiny base); cached across runs."""

    def __init__(self, params: BasePretrainParams):
        self.params = params

    def run(self, run, phase):
        from safetensors.torch import load_file

        from srde_core.train.checkpoints import save_tensors
        from srde_core.train.loop import TrainingTarget, train
        from srde_core.train.objective import build_objective

        if run.experts is not None:
            raise RecipeError(
                "base_pretrain must come before the phases that train experts",
                source=str(run.recipe.path), key=f"phases[{phase.index}].trainer",
            )
        key = _base_key(run, phase)
        run.extras["base_id"] = f"{run.recipe.model.architecture}:pretrained-{key}"
        cached = Path(run.recipe.cache_dir) / "base" / key / "model.safetensors"
        if self.params.cache and cached.is_file():
            run.model.load_state_dict(load_file(cached, device=str(run.device)))
            run.extras["base_weights"] = str(cached.resolve())
            run.log(f"{phase.name}: base loaded from cache {cached.parent}")
            return {}
        model = run.model
        for p in model.parameters():
            p.requires_grad_(True)
        target = TrainingTarget(
            model=model,
            parameters=list(model.parameters()),
            get_state=model.state_dict,
            set_state=lambda state: model.load_state_dict(state),
        )
        result = train(run, phase, target, build_objective(run, phase, model))
        # Without the cache the weights stay with the run, so `srde eval` can rebuild the model.
        final = cached if self.params.cache else run.run_dir / "base" / "model.safetensors"
        tmp = final.parent.with_name(f".tmp-{final.parent.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tensors(model.state_dict(), tmp / "model.safetensors")
        shutil.rmtree(final.parent, ignore_errors=True)
        os.replace(tmp, final.parent)
        run.extras["base_weights"] = str(final.resolve())
        run.log(f"{phase.name}: base saved to {final.parent}")
        return result


class Joint:
    """Joint SRDE training: routers and expert deltas on the frozen base, with the recipe's losses."""

    def __init__(self, params: NoParams):
        self.params = params

    def run(self, run, phase):
        from srde_core.train.loop import TrainingTarget, train
        from srde_core.train.objective import build_objective

        experts = run.attach_experts()
        target = TrainingTarget(
            model=run.model,
            parameters=list(experts.trainable_parameters().values()),
            get_state=experts.adapter.state_dict,
            set_state=experts.adapter.load_state_dict,
        )
        routers = list(experts.routers().values())
        return train(run, phase, target, build_objective(run, phase, run.model, routers))


@hookimpl
def srde_register(registry):
    registry.add("trainer", "base_pretrain", BasePretrain, BasePretrainParams)
    registry.add("trainer", "joint", Joint, NoParams)
