"""The ``difficulty`` loss: trains the dynamic banks' difficulty heads against the data.

Each example's difficulty level ``d`` (the batch's ``difficulty``, from the data's column) becomes
the target ``t = clamp((d - easiest) / (hardest - easiest), 0, 1)``; every real token of the example
gets that target. The loss is the binary cross-entropy between ``sigmoid(logit)`` of every head that
predicted in this forward and ``t``, averaged over the heads, over the real tokens of examples with
a known difficulty (level 0 is "none given"). Without difficulty (no column, or all 0) it is 0 and
the heads keep their predictions (at their zero start: the middle budget).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srde_core.train.losses import LossInputs
from srde_plugins.deltas.sparse.dynamic import DifficultyLossParams
from srde_plugins.deltas.sparse.dynamic.bank import DIFFICULTY_RECORD


def difficulty(params: DifficultyLossParams):
    span = float(params.hardest - params.easiest)

    def loss(inputs: LossInputs) -> torch.Tensor:
        zero = inputs.hidden.new_zeros((), dtype=torch.float32)
        level = inputs.batch.get("difficulty") if inputs.batch else None
        context = inputs.context
        logits = [v for k, v in context.records.items() if k[0] == DIFFICULTY_RECORD] if context is not None else []
        if level is None or not logits:
            return zero
        tokens = logits[0].shape[0]
        per_token = context.per_token(level.reshape(-1), tokens)
        keep = per_token > 0
        real = inputs.real_tokens(tokens)
        if real is not None:
            keep = keep & real.to(keep.device)
        rows = int(keep.sum())
        if rows == 0:  # every process still takes part in the global mean; 0 rows everywhere gives 0
            return torch.nan_to_num(inputs.global_mean(zero, 0), nan=0.0)
        target = ((per_token[keep].float() - params.easiest) / span).clamp_(0.0, 1.0)
        losses = [F.binary_cross_entropy_with_logits(l[keep.to(l.device)].float(), target.to(l.device)) for l in logits]
        return inputs.global_mean(torch.stack(losses).mean(), rows)

    return loss
