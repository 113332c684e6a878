"""The weighted sum of a phase's losses over one model forward."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from srde_core.train.losses import LossInputs
from srde_core.train.loop import LossFn


def build_objective(run, phase, model: torch.nn.Module, routers: Sequence[torch.nn.Module] = ()) -> LossFn:
    """A loss function for ``phase``: forward ``model``, then sum ``weight * loss`` over the recipe's losses.

    The forward stops at the backbone's final hidden state; losses apply the LM head where they
    need logits. Each loss's unweighted value is reported under its registry name.
    """
    losses = [(choice.name, choice.weight, run.build(choice)) for choice in phase.losses]
    num_domains = len(run.data.domains)
    backbone, lm_head = model.base_model, model.get_output_embeddings()

    def objective(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        inputs = LossInputs(
            hidden=out.last_hidden_state,
            lm_head=lm_head,
            labels=batch["labels"],
            batch=batch,
            routings=[r.last for r in routers if r.last is not None],
            num_domains=num_domains,
        )
        total = None
        parts: dict[str, float] = router_statistics(inputs.routings) if inputs.routings else {}
        for name, weight, loss in losses:
            value = loss(inputs)
            parts[name] = float(value.detach())
            term = weight * value
            total = term if total is None else total + term
        return total, parts

    return objective


def router_statistics(routings) -> dict[str, float]:
    """Logging only: the busiest expert's share of routed slots and the routing entropy (nats),
    averaged over SRDE layers. Read from each router's last routing, so recomputation under
    gradient checkpointing cannot count anything twice."""
    with torch.no_grad():
        max_load = torch.stack([r.load().max() for r in routings]).mean()
        entropy = torch.stack(
            [-(r.probs * r.probs.clamp_min(1e-9).log()).sum(-1).mean() for r in routings]
        ).mean()
    return {"router_max_load": float(max_load), "router_entropy": float(entropy)}
