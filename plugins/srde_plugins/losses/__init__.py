"""Losses: causal-LM cross-entropy, router load balance, router z-loss, expert specialisation and diversity.

A ``loss`` factory(params) returns ``loss(inputs: LossInputs) -> scalar tensor``; the recipe gives
each loss a ``weight`` (a number or a scalar schedule). Router losses are averaged over SRDE
layers; every loss is exact under data parallelism (``LossInputs.global_mean``, and global sums for
``specialization``). Under gradient accumulation the token means are exact and ``load_balance``'s and
``specialization``'s batch statistics are each micro-batch's (the step averages them).
"""

from __future__ import annotations

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class LMParams(Params):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    chunk_tokens: int = Field(
        4096, ge=1,
        description="labelled positions whose fp32 logits exist at once; more are checkpointed chunk by chunk",
    )


@hookimpl
def srde_register(registry):
    here = "srde_plugins.losses"
    registry.add("loss", "lm", f"{here}.lm:causal_lm", LMParams,
                 "Next-token cross-entropy over the labelled positions (labels -100 are ignored).")
    registry.add("loss", "load_balance", f"{here}.router:load_balance", NoParams,
                 "Switch-style load balance E * sum_e f_e * P_e (1.0 when balanced), mean over layers.")
    registry.add("loss", "router_z", f"{here}.router:router_z", NoParams,
                 "Router z-loss mean(logsumexp(logits)^2): keeps router logits small, mean over layers.")
    registry.add("loss", "specialization", f"{here}.experts:specialization", NoParams,
                 "-I(expert; domain)/log E from router probabilities: experts that tell the domain apart.")
    registry.add("loss", "diversity", f"{here}.experts:diversity", NoParams,
                 "Mean pairwise squared cosine of the experts' deltas per bank: experts that change different things.")
