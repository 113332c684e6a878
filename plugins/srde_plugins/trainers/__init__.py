"""Trainers: dense base pre-training (cached) and joint SRDE training on the frozen base.

Registration only (no torch); the trainers live in :mod:`.base_pretrain` and :mod:`.joint`.
Arguments go in the phase's trainer table: ``trainer = { name = "base_pretrain", cache = false }``.
"""

from __future__ import annotations

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class BasePretrainParams(Params):
    cache: bool = Field(
        True, description="reuse a base trained before with the same model, tokenizer, data, phase and seed"
    )


@hookimpl
def srde_register(registry):
    here = "srde_plugins.trainers"
    registry.add("trainer", "base_pretrain", f"{here}.base_pretrain:BasePretrain", BasePretrainParams,
                 "Dense pre-training of the whole base model (the embedded tiny base); cached across runs.")
    registry.add("trainer", "joint", f"{here}.joint:Joint", NoParams,
                 "Joint SRDE training: routers and expert deltas on the frozen base, with the recipe's losses.")
