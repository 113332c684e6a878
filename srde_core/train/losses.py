"""What a loss component receives. Losses are registered in the ``loss`` registry.

A ``loss`` factory(params) returns a callable ``loss(inputs: LossInputs) -> torch.Tensor`` (a
scalar). The trainer sums the recipe's losses, each times its ``weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from srde_core.model.routing import Routing


@dataclass
class LossInputs:
    """One micro-batch's model outputs and targets.

    ``hidden`` is the backbone's final hidden state ``[B, S, H]`` and ``lm_head`` the output
    projection: logits are computed by the losses that need them, and only where they need them
    (the LM loss applies the head to labelled positions alone; with a 32k-131k vocabulary that is
    most of a step's time and memory). ``labels`` are unshifted (-100: no target). ``routings``
    holds the routing of every SRDE layer for this forward (empty before experts are attached).
    ``batch`` is the collated batch (``input_ids``, ``attention_mask``, ``labels``, ``domain_ids``).
    """

    hidden: torch.Tensor
    lm_head: Callable[[torch.Tensor], torch.Tensor]
    labels: torch.Tensor
    batch: dict[str, torch.Tensor]
    routings: list[Routing] = field(default_factory=list)
    num_domains: int = 0

    def next_token_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states ``[N, H]``, targets ``[N]``) of the positions that predict a labelled token."""
        targets = self.labels[:, 1:]
        keep = targets != -100
        return self.hidden[:, :-1][keep], targets[keep]
