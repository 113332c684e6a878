"""Router losses (registered by :mod:`srde_plugins.losses`), averaged over SRDE layers.

Both are means over the real (non-padding) tokens of the global batch: the routed fractions ``f``
are counted over all processes, and the token means go through ``LossInputs.global_mean``, so the
value does not depend on how the batch is padded or split over processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from srde_core.model.routing import Routing
from srde_core.train.losses import LossInputs


def _layer_mean(inputs: LossInputs, per_layer: Callable[[Routing], torch.Tensor]) -> torch.Tensor:
    if not inputs.routings:
        return inputs.hidden.new_zeros((), dtype=torch.float32)
    return torch.stack([per_layer(r) for r in inputs.routings]).mean()


def load_balance(params):
    """E * sum_e f_e * P_e (Switch Transformer, Fedus et al. 2022): f_e the share of the slots the
    router chose (its top-k, also under a combine step that applies every expert; no gradient),
    P_e the mean probability."""
    return lambda inputs: _layer_mean(inputs, lambda routing: _balance(inputs, routing))


def _real(inputs: LossInputs, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts the router chose, probs, logits) of the real tokens only."""
    keep = inputs.real_tokens(routing.probs.shape[0])
    if keep is None:
        return routing.routed, routing.probs, routing.logits
    keep = keep.to(routing.probs.device)
    return routing.routed[keep], routing.probs[keep], routing.logits[keep]


def _balance(inputs: LossInputs, routing: Routing) -> torch.Tensor:
    experts, probs, _ = _real(inputs, routing)
    counts = torch.bincount(experts.reshape(-1), minlength=routing.num_experts).float()
    counts = inputs.global_sum(counts)
    fraction = counts / counts.sum().clamp_min(1.0)
    mean_prob = inputs.global_mean(probs.mean(dim=0), probs.shape[0])
    return routing.num_experts * torch.sum(fraction * mean_prob)


def router_z(params):
    """mean over tokens of logsumexp(logits)^2."""

    def per_layer(inputs: LossInputs, routing: Routing) -> torch.Tensor:
        _, _, logits = _real(inputs, routing)
        return inputs.global_mean(torch.logsumexp(logits, dim=-1).pow(2).mean(), logits.shape[0])

    def loss(inputs: LossInputs) -> torch.Tensor:
        return _layer_mean(inputs, lambda routing: per_layer(inputs, routing))

    return loss
