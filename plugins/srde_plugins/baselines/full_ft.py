"""The ``full_ft`` trainer (registered by :mod:`srde_plugins.baselines`): full fine-tuning of the
recipe's projections, the upper reference of an ablation.

Every weight of every module named in ``srde.projections`` (the MLP's ``gate_proj``, ``up_proj``,
``down_proj``) trains, densely; everything else stays frozen. The phase runs through the same step
driver, engine, checkpoints and resume as every phase; at the end the tuned weights are saved as the
run's base (``base/model.safetensors``), so ``srde eval`` and ``srde generate`` see the tuned model;
the run has no SRDE adapter.
"""

from __future__ import annotations

import torch

from srde_core.errors import SRDEError
from srde_core.train.driver import TrainingTarget, drive
from srde_core.train.objective import Objective, supervised_step
from srde_core.train.trainer import PhaseResult, Trainer
from srde_plugins.baselines.peft_lora import PeftLora


class FullFineTune(Trainer):
    """Dense fine-tuning of the recipe's projections of the base model."""

    def __init__(self, params=None):
        self.params = params

    def run(self, run, phase):
        if run.experts is not None:
            raise SRDEError("full_ft tunes the base's projections: put it before any phase that attaches experts",
                            key=f"phases[{phase.index}].trainer", source=str(run.recipe.path))
        model, projections = run.model, set(run.recipe.srde.projections)
        tuned = {name: p for name, p in model.named_parameters()
                 if name.rsplit(".", 2)[-2] in projections and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.Linear)}
        if not tuned:
            raise SRDEError(f"full_ft: no linear modules named {sorted(projections)} in the model", key="srde.projections")
        for name, p in model.named_parameters():
            p.requires_grad_(name in tuned)
        count = sum(p.numel() for p in tuned.values())
        run.log(f"{phase.name}: full fine-tuning of {', '.join(sorted(projections))}: {count:,} trainable")
        target = TrainingTarget.of(model, tuned)
        result = drive(run, phase, target, supervised_step(Objective(run, phase, model)))
        for p in tuned.values():
            p.requires_grad_(False)
        base = PeftLora._save_base(run, "full-ft", "tuned projections saved as the base")
        return PhaseResult(dict(result or {}, trainable_parameters=count), base)
