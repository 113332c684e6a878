"""The ``expert_pretrain`` trainer (Phase 1; registered by :mod:`srde_plugins.trainers`).

Every example routes to its domain's expert (domain ``d`` -> expert ``d mod E`` of each layer),
forced through the forward context, so each expert learns its own domain; all experts train in the
same batched forward and backward. The routers do not train here (their choice is overridden).
With ``sampler = "domain_balanced"`` every batch holds the same number of examples of each domain,
drawn from the cached per-domain shards, so every expert gets equal examples per update.
Afterwards the routers are warm-started from the domain centroids of each layer's input, so a
following ``joint`` phase starts with experts and routers that already agree.
"""

from __future__ import annotations

import torch

from srde_core.data.collate import collate
from srde_core.evaluate import evaluation_state
from srde_core.model.context import ForwardContext
from srde_core.train.driver import TrainingTarget, drive
from srde_core.train.objective import Objective, supervised_step
from srde_core.train.trainer import Trainer


def domain_assignment(domain_ids: torch.Tensor, plans) -> dict[int, torch.Tensor]:
    """Layer -> the expert of each example: its domain modulo the layer's expert count."""
    return {plan.layer: domain_ids % plan.num_experts for plan in plans}


class ForcedObjective(Objective):
    """The supervised objective with every example forced to its domain's expert."""

    def context_for(self, batch):
        context = super().context_for(batch)
        context.forced_experts = domain_assignment(batch["domain_ids"], self.experts.plans)
        return context


class ExpertPretrain(Trainer):
    """Phase 1: each expert pre-trained on its own domain, all experts in one batched step."""

    def __init__(self, params):
        self.params = params

    def run(self, run, phase):
        experts = run.attach_experts()
        trainable = {name: p for name, p in experts.trainable_parameters().items() if name.startswith("banks.")}
        target = TrainingTarget(
            model=run.model,
            parameters=list(trainable.values()),
            get_state=experts.adapter.state_dict,
            set_state=experts.adapter.load_state_dict,
        )
        objective = ForcedObjective(run, phase, run.model, experts)
        result = drive(run, phase, target, supervised_step(objective), state=objective.schedules)
        if self.params.warm_start_router:
            warm_start_routers(run, experts, self.params.warm_start_batches)
            run.log(f"{phase.name}: routers warm-started from the domain centroids of each layer")
        return result


@torch.no_grad()
def layer_centroids(run, experts, batches: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer: the mean input of each domain ``[D, H]`` and a sample of inputs ``[N, H]``, from
    the first ``batches`` training batches with the experts on and forced as in Phase 1."""
    num_domains = len(run.data.domains)
    sums: dict[int, torch.Tensor] = {}
    counts = torch.zeros(num_domains)
    samples: dict[int, list[torch.Tensor]] = {layer: [] for layer in experts.layers}
    current: dict[str, torch.Tensor] = {}

    def hook(module, args):
        hidden = args[0].reshape(-1, args[0].shape[-1]).float().cpu()
        keep = current["mask"]
        domains = current["domains"]
        sums[module.layer] = sums.get(module.layer, torch.zeros(num_domains, hidden.shape[1])).index_add(0, domains, hidden[keep])
        samples[module.layer].append(hidden[keep][:256])

    handles = [mlp.register_forward_pre_hook(hook) for mlp in experts.layers.values()]
    size = min(len(run.data.train), 64)
    try:
        with evaluation_state(run.model, experts, enabled=True):
            for b in range(batches):
                start = (b * size) % len(run.data.train)
                rows = run.data.train.select(range(start, min(start + size, len(run.data.train))))
                batch = collate(rows, run.tokenizer.pad_id, "all", run.data.domains)
                mask = batch["attention_mask"].reshape(-1).bool()
                current["mask"] = mask
                current["domains"] = batch["domain_ids"][:, None].expand_as(batch["attention_mask"]).reshape(-1)[mask]
                counts.index_add_(0, current["domains"], torch.ones(int(mask.sum())))
                inputs = {k: v.to(run.device) for k, v in batch.items()}
                context = ForwardContext(
                    domain_ids=inputs["domain_ids"], forced_experts=domain_assignment(inputs["domain_ids"], experts.plans)
                )
                with experts.forward_context(context):
                    run.model.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    centroids = {layer: total / counts.clamp_min(1)[:, None] for layer, total in sums.items()}
    return centroids, {layer: torch.cat(parts) for layer, parts in samples.items()}


def warm_start_routers(run, experts, batches: int) -> None:
    """Each layer's router points expert ``e`` at the mean centroid of its domains minus the mean of
    all, with the mean's own direction projected out (the gate has no bias: the component every
    input shares would otherwise favour some experts for every token)."""
    centroids, samples = layer_centroids(run, experts, batches)
    num_domains = len(run.data.domains)
    for plan in experts.plans:
        c = centroids[plan.layer]
        mean = c.mean(0)
        directions = torch.stack([
            c[[d for d in range(num_domains) if d % plan.num_experts == e]].mean(0) - mean
            if e < num_domains else torch.zeros_like(mean)
            for e in range(plan.num_experts)
        ])
        unit_mean = mean / mean.norm().clamp_min(1e-12)
        directions = directions - (directions @ unit_mean)[:, None] * unit_mean
        router = experts.layers[plan.layer].router
        router.warm_start(directions.to(next(router.parameters()).device), samples[plan.layer] - mean)
