"""Losses: causal-LM cross-entropy, router load balance and router z-loss.

A ``loss`` factory(params) returns ``loss(inputs: LossInputs) -> scalar tensor``; the recipe gives
each loss a ``weight``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params

if TYPE_CHECKING:  # torch is imported when a loss is built, not when plugins are listed
    import torch

    from srde_core.train.losses import LossInputs


class LMParams(Params):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")


def causal_lm(params: LMParams):
    """Next-token cross-entropy over the labelled positions (labels -100 are ignored)."""
    import torch.nn.functional as F

    def loss(inputs: LossInputs) -> torch.Tensor:
        hidden, targets = inputs.next_token_targets()
        logits = inputs.lm_head(hidden).float()
        return F.cross_entropy(logits, targets, label_smoothing=params.label_smoothing)

    return loss


def _router_mean(inputs: LossInputs, per_router) -> torch.Tensor:
    import torch

    if not inputs.routings:
        return inputs.hidden.new_zeros((), dtype=torch.float32)
    return torch.stack([per_router(r) for r in inputs.routings]).mean()


def load_balance(params: NoParams):
    """Switch-style load balance E * sum_e f_e * P_e (1.0 when perfectly balanced), mean over layers."""

    import torch

    def per_router(routing) -> torch.Tensor:
        fraction = routing.load()  # share of routed slots per expert, no gradient
        mean_prob = routing.probs.mean(dim=0)
        return routing.num_experts * torch.sum(fraction * mean_prob)

    return lambda inputs: _router_mean(inputs, per_router)


def router_z(params: NoParams):
    """Router z-loss mean(logsumexp(logits)^2): keeps router logits small and training stable."""
    import torch

    return lambda inputs: _router_mean(
        inputs, lambda r: torch.logsumexp(r.logits, dim=-1).pow(2).mean()
    )


@hookimpl
def srde_register(registry):
    registry.add("loss", "lm", causal_lm, LMParams)
    registry.add("loss", "load_balance", load_balance, NoParams)
    registry.add("loss", "router_z", router_z, NoParams)
