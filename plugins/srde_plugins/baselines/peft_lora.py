"""The ``peft_lora`` trainer (registered by :mod:`srde_plugins.baselines`).

PEFT injects LoRA layers into the recipe's projections of every decoder layer; the phase trains
them with the recipe's losses (no routing, so ``lm``) through the same step driver, engine,
checkpoints and resume as every phase. At the end the LoRA deltas are merged into the weights and
saved as the run's base (``base/model.safetensors``), so ``srde eval`` and ``srde generate`` see the
tuned model; the run has no SRDE adapter.
"""

from __future__ import annotations

import copy
import os
import shutil

import torch

from srde_core.errors import SRDEError
from srde_core.train.checkpoints import save_tensors
from srde_core.train.driver import TrainingTarget, drive
from srde_core.train.objective import Objective, supervised_step
from srde_core.train.trainer import BaseInfo, PhaseResult, Trainer


def lora_parameter_count(model: torch.nn.Module, projections: list[str], rank: int) -> int:
    """Trainable values of rank-``rank`` LoRA on every module named in ``projections``: r (in + out) each."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in projections and isinstance(m, torch.nn.Linear))


def matching_rank(model: torch.nn.Module, recipe, projections: list[str]) -> tuple[int, int]:
    """The LoRA rank whose count is closest to that of ``recipe``'s experts, and that count."""
    from srde_core.model.build import attach_recipe_experts

    experts = attach_recipe_experts(copy.deepcopy(model), recipe)
    target = sum(p.numel() for p in experts.trainable_parameters().values())
    per_rank = lora_parameter_count(model, projections, 1)
    if per_rank == 0:
        raise SRDEError(f"peft_lora: no linear modules named {projections} in the model", key="srde.projections")
    return max(1, round(target / per_rank)), target


class PeftLora(Trainer):
    """PEFT LoRA on the frozen base: the baseline row of an ablation."""

    def __init__(self, params):
        self.params = params

    def run(self, run, phase):
        try:
            from peft import LoraConfig, inject_adapter_in_model
            from peft.tuners.lora import LoraLayer
        except ImportError:
            raise SRDEError('the peft_lora trainer needs peft: pip install "srde[baselines]"',
                            key=f"phases[{phase.index}].trainer") from None
        if run.experts is not None:
            raise SRDEError("peft_lora trains the base with LoRA: put it before any phase that attaches experts",
                            key=f"phases[{phase.index}].trainer", source=str(run.recipe.path))
        model, projections = run.model, list(run.recipe.srde.projections)
        rank, matched = self.params.rank, None
        if rank == 0:
            rank, matched = matching_rank(model, run.recipe, projections)
        alpha = self.params.alpha or 2.0 * rank
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=self.params.dropout, target_modules=projections)
        inject_adapter_in_model(config, model)
        model.to(run.device)
        lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
        for p in lora.values():
            p.requires_grad_(True)
        count = sum(p.numel() for p in lora.values())
        run.log(f"{phase.name}: PEFT LoRA rank {rank} (alpha {alpha:g}) on {', '.join(projections)}: "
                f"{count:,} trainable" + (f" (experts of the recipe: {matched:,})" if matched is not None else ""))
        target = TrainingTarget.of(model, lora)
        result = drive(run, phase, target, supervised_step(Objective(run, phase, model)))
        result = dict(result or {}, lora_rank=rank, trainable_parameters=count)
        _merge_and_unload(model, LoraLayer)
        return PhaseResult(result, self._save_base(run))

    @staticmethod
    def _save_base(run, suffix: str = "peft-lora", what: str = "LoRA merged into the base") -> BaseInfo:
        """Save the run's model as its base; return that base (the run's base id, ``+suffix``)."""
        final = run.run_dir / "base" / "model.safetensors"
        if run.dist.is_main:
            tmp = final.parent.with_name(f".tmp-base-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_tensors(run.model.state_dict(), tmp / "model.safetensors")
            shutil.rmtree(final.parent, ignore_errors=True)
            os.replace(tmp, final.parent)
        run.dist.barrier()
        run.log(f"{what}: {final.parent}")
        return BaseInfo(f"{run.base.id}+{suffix}", str(final.resolve()))


@torch.no_grad()
def _merge_and_unload(model: torch.nn.Module, layer_type: type) -> None:
    """Merge every LoRA layer into its base linear and put the base linear back in its place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_type):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
