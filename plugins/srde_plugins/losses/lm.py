"""The causal-LM loss (registered by :mod:`srde_plugins.losses`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from srde_core.train.losses import LossInputs


def causal_lm(params):
    """Next-token cross-entropy over the labelled positions (labels -100 are ignored)."""

    def loss(inputs: LossInputs) -> torch.Tensor:
        hidden, targets = inputs.next_token_targets()
        nll = chunked_nll_sum(inputs.lm_head, hidden, targets, params.chunk_tokens, params.label_smoothing)
        return inputs.global_mean(nll / targets.numel(), targets.numel())

    return loss


def chunked_nll_sum(
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``sum_i CE(lm_head(hidden[i]), targets[i])`` (logits in at least fp32) over the ``N`` rows of ``hidden [N, H]``.

    The rows go through the head ``chunk_tokens`` at a time. With more than one chunk each is
    checkpointed: its logits are freed after the forward and recomputed in the backward, so the
    fp32 logits ``[N, V]`` and their gradient never exist for more than one chunk at once (the
    price is a second head forward per chunk). A sum of per-chunk sums is the same loss and the
    same gradient as one cross-entropy over every row.
    """
    if hidden.shape[0] <= chunk_tokens:
        return _nll_sum(lm_head, hidden, targets, label_smoothing)
    total = None
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = (lm_head, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens], label_smoothing)
        value = checkpoint(_nll_sum, *part, use_reentrant=False) if torch.is_grad_enabled() else _nll_sum(*part)
        total = value if total is None else total + value
    return total


def _nll_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    logits = lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half types in fp32, float64 kept
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")
