"""Trainers: dense base pre-training (cached), Phase 1 expert pre-training by domain, joint SRDE training.

Registration only (no torch); the trainers live in :mod:`.base_pretrain` and :mod:`.joint`.
Arguments go in the phase's trainer table: ``trainer = { name = "base_pretrain", cache = false }``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class BasePretrainParams(Params):
    cache: bool = Field(
        True, description="reuse a base trained before with the same model, tokenizer, data, phase and seed"
    )


class ExpertPretrainParams(Params):
    warm_start_router: bool = Field(
        True, description="afterwards, point each layer's router at the domain centroids of its input"
    )
    warm_start_examples: int = Field(
        64, ge=1, description="training examples per domain the centroids are computed on, drawn at random with the "
        "run's seed (in micro-batches of the phase's batch_size)",
    )
    warm_start_tokens: Literal["all", "labelled"] = Field(
        "all", description="the tokens the centroids average: every real token, or the labelled ones only (the "
        "answers under loss_on = \"answer\": the tokens the experts are trained on, after the prompt that names "
        "the domain)",
    )


@hookimpl
def srde_register(registry):
    here = "srde_plugins.trainers"
    registry.add("trainer", "base_pretrain", f"{here}.base_pretrain:BasePretrain", BasePretrainParams,
                 "Dense pre-training of the whole base model (the embedded tiny base); cached across runs.")
    registry.add("trainer", "expert_pretrain", f"{here}.expert_pretrain:ExpertPretrain", ExpertPretrainParams,
                 "Phase 1: every example forced to its domain's expert, all experts in one batched step; router warm start.")
    registry.add("trainer", "joint", f"{here}.joint:Joint", NoParams,
                 "Joint SRDE training: routers and expert deltas on the frozen base, with the recipe's losses.")
