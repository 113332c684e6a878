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

from srde_core.data.collate import IGNORE_INDEX, collate
from srde_core.data.groups import group_rows
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
            missing = warm_start_routers(run, experts, self.params.warm_start_examples, phase.batch_size,
                                         labelled_only=self.params.warm_start_tokens == "labelled")
            run.log(f"{phase.name}: routers warm-started from the domain centroids of each layer "
                    f"({self.params.warm_start_examples} examples per domain)")
            if missing:
                run.log(f"warning: no training rows of {', '.join(missing)}: their experts get no warm-start direction")
        return result


def warm_start_rows(run, per_domain: int) -> list[int]:
    """Up to ``per_domain`` training rows of every domain, drawn at random (seeded with the run's
    seed, so every process and a resumed run draw the same): a file sorted by domain gives every
    domain its centroid, not only the domains of its first rows."""
    groups = group_rows(run.data.train, "domain")
    generator = torch.Generator().manual_seed(run.recipe.seed)
    rows: list[int] = []
    for domain in run.data.domains:
        if domain not in groups.values:
            continue
        members = torch.as_tensor(groups.rows(domain), dtype=torch.long)
        rows.extend(members[torch.randperm(len(members), generator=generator)[:per_domain]].tolist())
    return rows


@torch.no_grad()
def layer_centroids(run, experts, rows: list[int], batch_size: int, labelled_only: bool = False):
    """Per layer: the summed input of each domain ``[D, H]``, the token count of each domain ``[D]``
    and a sample of inputs ``[N, H]``, over the real tokens (``labelled_only``: the tokens with a
    label under the data's ``loss_on``) of ``rows`` of the training data with the experts on and
    forced as in Phase 1, in micro-batches of ``batch_size`` (the phase's, so the forward stays
    within the memory the phase trained in). The forwards go through the engine's forward-only
    mode: under ZeRO-3 each layer's weights are fetched as it runs, never the whole model."""
    num_domains = len(run.data.domains)
    sums: dict[int, torch.Tensor] = {}
    counts = torch.zeros(num_domains, dtype=torch.float64)
    samples: dict[int, list[torch.Tensor]] = {layer: [] for layer in experts.layers}
    current: dict[str, torch.Tensor] = {}

    @torch.compiler.disable
    def hook(module, args):
        hidden = args[0].reshape(-1, args[0].shape[-1]).double().cpu()[current["mask"]]
        total = sums.get(module.layer, torch.zeros(num_domains, hidden.shape[1], dtype=torch.float64))
        sums[module.layer] = total.index_add(0, current["domains"], hidden)
        samples[module.layer].append(hidden[:256].float())

    handles = [mlp.register_forward_pre_hook(hook) for mlp in experts.layers.values()]
    try:
        with evaluation_state(run.model, experts, enabled=True), run.engine.forward_only(run.model) as forward:
            for start in range(0, len(rows), batch_size):
                batch = collate(run.data.train.select(rows[start:start + batch_size]), run.tokenizer.pad_id,
                                run.recipe.data.loss_on, run.data.domains)
                mask = batch["attention_mask"].reshape(-1).bool()
                if labelled_only:
                    mask = mask & (batch["labels"].reshape(-1) != IGNORE_INDEX)
                current["mask"] = mask
                current["domains"] = batch["domain_ids"][:, None].expand_as(batch["attention_mask"]).reshape(-1)[mask]
                counts.index_add_(0, current["domains"], torch.ones(int(mask.sum()), dtype=torch.float64))
                inputs = {k: v.to(run.device) for k, v in batch.items()}
                context = ForwardContext(
                    domain_ids=inputs["domain_ids"], forced_experts=domain_assignment(inputs["domain_ids"], experts.plans)
                )
                with experts.forward_context(context):
                    forward(lambda model: model.base_model(input_ids=inputs["input_ids"],
                                                           attention_mask=inputs["attention_mask"], use_cache=False))
    finally:
        for handle in handles:
            handle.remove()
    return sums, counts, {layer: torch.cat(parts) for layer, parts in samples.items() if parts}


def warm_start_routers(run, experts, per_domain: int, batch_size: int, labelled_only: bool = False) -> list[str]:
    """Each layer's router points expert ``e`` at the mean centroid of its domains minus the mean of
    all, with the mean's own direction projected out (the gate has no bias: the component every
    input shares would otherwise favour some experts for every token). A domain without training
    rows has no centroid: its experts get no direction (returned, for the log)."""
    rows = warm_start_rows(run, per_domain)
    sums, counts, samples = layer_centroids(run, experts, rows, batch_size, labelled_only)
    num_domains = len(run.data.domains)
    present = [d for d in range(num_domains) if counts[d] > 0]
    missing = [run.data.domains[d] for d in range(num_domains) if counts[d] == 0]
    routers = [experts.layers[plan.layer].router for plan in experts.plans]
    with run.engine.modifying([p for router in routers for p in router.parameters()]):
        for plan in experts.plans:
            c = (sums[plan.layer] / counts.clamp_min(1)[:, None]).float()
            mean = c[present].mean(0)
            directions = torch.stack([
                c[owned].mean(0) - mean if (owned := [d for d in present if d % plan.num_experts == e])
                else torch.zeros_like(mean)
                for e in range(plan.num_experts)
            ])
            unit_mean = mean / mean.norm().clamp_min(1e-12)
            directions = directions - (directions @ unit_mean)[:, None] * unit_mean
            router = experts.layers[plan.layer].router
            if run.dist.is_main or not run.engine.collective_forwards:
                router.warm_start(directions.to(next(router.parameters()).device), samples[plan.layer] - mean)
    return missing
