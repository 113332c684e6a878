"""Routing: the `topk` router and the combine steps `weighted_sum`, `gated` and `soft_merge` (expert fusion).

``weighted_sum`` keeps the router's weights and adds the delta terms to the base output; ``gated``
learns a per-token gate on each chosen expert's term; ``soft_merge`` applies every expert weighted by
its full-softmax probability (see :mod:`.fusion`).

Gate normalisations of ``topk`` (``gate``):

- ``softmax_topk``: softmax over the k chosen logits, i.e. the chosen experts' full-softmax
  probabilities renormalised to sum to 1 (Mixtral; GShard's top-2 gates, Lepikhin et al. 2021,
  are renormalised the same way). At k = 1 the weight is always 1, so the task loss gives the
  router no gradient.
- ``softmax``: the chosen experts' probabilities under the softmax over all experts, not
  renormalised (Switch Transformer at k = 1, Fedus et al. 2022; DeepSeekMoE, Dai et al. 2024).
  The task loss reaches the router at every k.
- ``auto`` (default): ``softmax_topk`` for k >= 2 and ``softmax`` for k = 1: the common choice
  at k >= 2, and a router that learns from the task at k = 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class TopKParams(Params):
    """Arguments of the ``topk`` router."""

    gate: Literal["auto", "softmax_topk", "softmax"] = Field(
        "auto",
        description=(
            "gate weights of the chosen experts: softmax over the chosen k ('softmax_topk'), their "
            "full-softmax probabilities ('softmax'), or 'auto' (softmax_topk for k >= 2, softmax at k = 1)"
        ),
    )
    init_std: float = Field(
        0.0, ge=0.0, description="std of the gate's initial weights; 0: hidden_size ** -0.5"
    )


@hookimpl
def srde_register(registry):
    registry.add(
        "router", "topk", "srde_plugins.routing.topk:TopKRouterType", TopKParams,
        "Linear gate on the MLP input, top-k experts per token; gate: auto, softmax_topk or softmax.",
    )
    registry.add(
        "combine", "weighted_sum", "srde_plugins.routing.topk:WeightedSumType", NoParams,
        "The router's gate weights; each projection adds sum_k w_k dW_k x to its base output.",
    )
    registry.add(
        "combine", "gated", "srde_plugins.routing.fusion:GatedFusionType", NoParams,
        "Expert fusion: a learned per-token gate 2*sigmoid(x.v_e + b_e) on each chosen expert's weight (starts at 1).",
    )
    registry.add(
        "combine", "soft_merge", "srde_plugins.routing.fusion:SoftMergeType", NoParams,
        "Expert fusion: every expert, weighted by its full-softmax probability (a soft merge of deltas, SMEAR-style).",
    )
