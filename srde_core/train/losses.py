"""What a loss component receives. Losses are registered in the ``loss`` registry.

A ``loss`` factory(params) returns a callable ``loss(inputs: LossInputs) -> torch.Tensor`` (a
scalar). The objective sums the recipe's losses, each times its ``weight`` (a number, or a scalar
schedule evaluated at the step).

Data parallelism: each process sees its share of the global batch and the engine averages the
gradients over processes. A loss that is a mean over rows (tokens, examples) returns
``inputs.global_mean(local_mean, rows)``, so that this average is the mean over the *global*
batch, exactly, whatever the share of rows each process had; in one process it is ``local_mean``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from srde_core.dist import SINGLE, Dist
from srde_core.model.components import DeltaBank
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing


@dataclass
class LossInputs:
    """One micro-batch's model outputs and targets.

    ``hidden`` is the backbone's final hidden state ``[B, S, H]`` and ``lm_head`` the output
    projection: logits are computed by the losses that need them, and only where they need them
    (the LM loss applies the head to labelled positions alone; with a 32k-131k vocabulary that is
    most of a step's time and memory). ``labels`` are unshifted (-100: no target). ``routings``
    holds the routing of every SRDE layer for this forward, in layer order (empty before experts
    are attached); ``context`` is the forward context they came from. ``batch`` is the collated
    batch (``input_ids``, ``attention_mask``, ``labels``, ``domain_ids``). ``banks`` are the
    experts' delta banks (each shared bank once) for losses on the deltas themselves. ``step`` is
    the 0-based optimiser step.
    """

    hidden: torch.Tensor
    lm_head: Callable[[torch.Tensor], torch.Tensor]
    labels: torch.Tensor
    batch: dict[str, torch.Tensor]
    routings: list[Routing] = field(default_factory=list)
    num_domains: int = 0
    context: ForwardContext | None = None
    banks: list[DeltaBank] = field(default_factory=list)
    step: int = 0
    dist: Dist = SINGLE

    def next_token_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states ``[N, H]``, targets ``[N]``) of the positions that predict a labelled token."""
        targets = self.labels[:, 1:]
        keep = targets != -100
        return self.hidden[:, :-1][keep], targets[keep]

    def real_tokens(self, tokens: int) -> torch.Tensor | None:
        """``[tokens]`` bool: which of a layer's flat tokens are real (not padding), from the batch's
        attention mask; None when the batch has no mask of that size (everything is real)."""
        mask = self.batch.get("attention_mask") if self.batch else None
        if mask is None or mask.numel() != tokens:
            return None
        return mask.reshape(-1).bool()

    def global_mean(self, local_mean: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
        """Turn this process's mean over ``rows`` rows into its share of the global-batch mean:
        ``local_mean * rows * world / global_rows`` (``local_mean`` itself in one process)."""
        if not self.dist.distributed:
            return local_mean
        count = torch.as_tensor(rows, dtype=torch.float64, device=local_mean.device)
        total = self.dist.all_sum(count)
        return local_mean * (count * self.dist.world_size / total).to(local_mean.dtype)

    def global_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over processes, without gradient (counts, loads)."""
        return self.dist.all_sum(tensor)
