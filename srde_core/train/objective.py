"""The supervised objective (the weighted sum of a phase's losses over one forward) and the
supervised step function built on it."""

from __future__ import annotations

import math
from typing import Any

import torch

from srde_core.model.context import ForwardContext
from srde_core.registry import ComponentChoice
from srde_core.train.driver import StepContext, StepFn
from srde_core.train.engine import EngineSession
from srde_core.train.losses import LossInputs


class Objective:
    """``objective(batch, step, session) -> (loss, parts)``: forward through the engine session,
    then ``sum(weight * loss)`` over the phase's losses.

    The forward stops at the backbone's final hidden state; losses apply the LM head where they
    need logits. With experts attached, the forward runs in a :class:`ForwardContext` carrying the
    batch's domain ids (and difficulty, where the data has it), which plugins may extend
    (``srde_forward_context``); the routings come back through it. Each loss's unweighted value is
    reported under its registry name. A weight that is a schedule is evaluated at the step;
    :attr:`schedules` are the built ones (checkpointed by the driver).
    """

    def __init__(self, run: Any, phase: Any, model: torch.nn.Module, experts: Any = None):
        self.run, self.phase, self.experts = run, phase, experts
        self.losses = [(choice.name, self._weight(choice), choice.build()) for choice in phase.losses]
        self.schedules = {
            f"loss_weight.{name}": weight for name, weight, _ in self.losses if not isinstance(weight, float)
        }
        self.num_domains = len(run.data.domains)
        self.model = model
        self.lm_head = model.get_output_embeddings()
        self.banks = [bank for per_proj in experts.banks().values() for bank in per_proj.values()] if experts else []

    @staticmethod
    def _weight(choice: ComponentChoice) -> Any:
        return choice.weight.build() if isinstance(choice.weight, ComponentChoice) else float(choice.weight)

    def context_for(self, batch: dict[str, torch.Tensor]) -> ForwardContext:
        """The core's training context of ``batch`` (``ForwardContext.from_batch``, mode
        ``"train"``), extended by the plugins' ``srde_forward_context``."""
        context = ForwardContext.from_batch(batch, "train")
        self.run.hook.srde_forward_context(context=context, batch=batch, phase=self.phase, run=self.run)
        return context

    def __call__(self, batch: dict[str, torch.Tensor], step: int, session: EngineSession) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        context = None
        if self.experts is not None:
            context = self.context_for(batch)
            with self.experts.forward_context(context):
                hidden = session.forward(**inputs)
        else:
            hidden = session.forward(**inputs)
        routings = context.ordered_routings() if context is not None else []
        loss_inputs = LossInputs(
            hidden=hidden, lm_head=self.lm_head, labels=batch["labels"], batch=batch, routings=routings,
            num_domains=self.num_domains, context=context, banks=self.banks, step=step, dist=self.run.dist,
        )
        total = None
        parts: dict[str, float] = router_statistics(routings, batch.get("attention_mask")) if routings else {}
        unlabelled = None  # whether no position of this micro-batch predicts a labelled token
        for name, weight, loss in self.losses:
            value = loss(loss_inputs)
            number = float(value.detach())
            if math.isnan(number):
                if unlabelled is None:
                    unlabelled = not bool((batch["labels"][:, 1:] != -100).any())
                if unlabelled:  # a token mean over no token (0/0): it adds nothing, as its weight in the step says
                    value, number = torch.nan_to_num(value, nan=0.0), 0.0
            parts[name] = number
            factor = weight if isinstance(weight, float) else weight.value(step, self.phase.steps)
            if not isinstance(weight, float):
                parts[f"{name}_weight"] = factor
            term = factor * value
            total = term if total is None else total + term
        return total, parts


def supervised_step(objective: Objective) -> StepFn:
    """One optimiser step over ``grad_accum`` micro-batches of the objective.

    Micro-batches are weighted by their share of the step's labelled tokens (counted over every
    process), so ``grad_accum = k`` at batch ``b`` is the same step as batch ``k * b`` for token-mean
    losses such as the LM loss; losses that are means over something else (router losses) are then
    weighted the same way.
    """

    def step(ctx: StepContext) -> dict[str, Any]:
        micro = list(ctx.micro_batches())
        shares = token_shares([batch for _, batch in micro], ctx.run.dist)
        sums: dict[str, float] = {}
        tokens = 0
        for (last, batch), share in zip(micro, shares):
            with ctx.session.micro_step(last):
                with ctx.session.autocast():
                    loss, parts = objective(batch, ctx.step, ctx.session)
                ctx.session.backward(loss * share)
            tokens += int(batch["attention_mask"].sum())
            if share == 0:  # no labelled token: it adds nothing to the step (its token means are 0/0)
                continue
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value * share
        if getattr(ctx.phase, "on_nonfinite", "stop") == "skip" and not _finite_step(ctx, objective, sums):
            for parameter in objective.model.parameters():
                parameter.grad = None  # the update is dropped; the data and the step count move on
            nan = float("nan")
            return {**sums, "lr": nan, "grad_norm": nan, "tokens": tokens, "skipped": 1.0}
        return {**sums, **ctx.session.step(), "tokens": tokens}

    return step


def _finite_step(ctx: StepContext, objective: Objective, sums: dict[str, float]) -> bool:
    """Whether the step's loss and every gradient are finite, on every process (``on_nonfinite =
    "skip"`` checks before the optimiser step; the default policy checks the step's metrics)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in objective.model.parameters()
             if p.grad is not None]
    bad_grad = bool(norms) and not bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())
    bad_loss = not math.isfinite(sums.get("loss", 0.0))
    flags = ctx.run.dist.all_sum(torch.tensor([float(bad_loss), float(bad_grad)], dtype=torch.float64))
    return float(flags.sum()) == 0


def token_shares(batches: list[dict[str, torch.Tensor]], dist: Any) -> list[float]:
    """Each micro-batch's share of the labelled (next-token) targets of the step, over every
    process; equal shares when no micro-batch has any."""
    counts = torch.tensor([float((b["labels"][:, 1:] != -100).sum()) for b in batches], dtype=torch.float64)
    counts = dist.all_sum(counts)
    total = float(counts.sum())
    if total <= 0:
        return [1.0 / len(batches)] * len(batches)
    return [float(c) / total for c in counts]


def router_statistics(routings, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Logging only: the busiest expert's share of the slots the router chose (``Routing.routed``,
    whatever the combine step applies) and the routing entropy (nats), over
    the real tokens (``attention_mask``), averaged over SRDE layers. Read from the forward context's
    routings, so recomputation under gradient checkpointing cannot count anything twice."""
    loads, entropies = [], []
    with torch.no_grad():
        for r in routings:
            keep = attention_mask.reshape(-1).bool() if attention_mask is not None and attention_mask.numel() == r.probs.shape[0] else None
            experts, probs = (r.routed, r.probs) if keep is None else (r.routed[keep], r.probs[keep])
            counts = torch.bincount(experts.reshape(-1), minlength=r.num_experts).float()
            loads.append(counts.max() / counts.sum().clamp_min(1.0))
            entropies.append(-(probs * probs.clamp_min(1e-9).log()).sum(-1).mean())
        max_load, entropy = torch.stack(loads).mean(), torch.stack(entropies).mean()
    return {"router_max_load": float(max_load), "router_entropy": float(entropy)}
