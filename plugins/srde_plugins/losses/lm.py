"""The causal-LM loss (registered by :mod:`srde_plugins.losses`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srde_core.train.losses import LossInputs


def causal_lm(params):
    """Next-token cross-entropy over the labelled positions (labels -100 are ignored)."""

    def loss(inputs: LossInputs) -> torch.Tensor:
        hidden, targets = inputs.next_token_targets()
        logits = inputs.lm_head(hidden).float()
        local = F.cross_entropy(logits, targets, label_smoothing=params.label_smoothing)
        return inputs.global_mean(local, targets.numel())

    return loss
