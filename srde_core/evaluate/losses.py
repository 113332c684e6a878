"""Per-domain eval loss: the training LM loss (token-weighted mean next-token NLL) on eval rows.

The forward is the one training uses: the backbone's final hidden state, then the LM head applied
only to the positions that predict a labelled token (``loss_on`` as in the recipe), so an eval loss
and a training loss measure the same quantity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from srde_core.data.collate import IGNORE_INDEX, collate
from srde_core.model.context import ForwardContext

# Positions whose logits are materialised at once: with a 32k-131k vocabulary a whole eval batch
# of logits would not fit next to a large model.
_LOGIT_CHUNK = 4096


@dataclass(frozen=True)
class DomainLoss:
    """Summed NLL and number of predicted tokens of one domain; ``loss`` is their ratio."""

    domain: str
    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan


def eval_subset(dataset, domains: Sequence[str], max_per_domain: int | None):
    """The first ``max_per_domain`` rows of each domain (all with ``None``), grouped by domain in
    ``domains`` order and in dataset order within a domain: deterministic."""
    wanted = {d: [] for d in domains}
    for index, domain in enumerate(dataset["domain"]):
        chosen = wanted.setdefault(domain, [])
        if max_per_domain is None or len(chosen) < max_per_domain:
            chosen.append(index)
    return dataset.select([i for d in wanted for i in wanted[d]])


def eval_batches(
    rows, *, pad_id: int, loss_on: str, domains: Sequence[str], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """``rows`` collated (right padding, labels per ``loss_on``) into CPU batches of ``batch_size``.

    Collate once and reuse the batches for the base and the SRDE pass."""
    return [
        collate(rows[start:start + batch_size], pad_id, loss_on, domains)
        for start in range(0, len(rows), batch_size)
    ]


def next_token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll [N], domain ids [N])`` of the N positions of ``batch`` that predict a labelled token.

    ``batch`` must be on the model's device. Runs one forward of ``model``."""
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = out.last_hidden_state[:, :-1][keep]
    targets = targets[keep]
    lm_head = model.get_output_embeddings()
    nll = torch.cat([
        F.cross_entropy(lm_head(hidden[i:i + _LOGIT_CHUNK]).float(), targets[i:i + _LOGIT_CHUNK], reduction="none")
        for i in range(0, hidden.shape[0], _LOGIT_CHUNK)
    ]) if hidden.shape[0] else hidden.new_zeros(0, dtype=torch.float32)
    domain_ids = batch["domain_ids"][:, None].expand_as(keep)[keep]
    return nll, domain_ids


def domain_losses(
    model,
    batches: Sequence[dict[str, torch.Tensor]],
    domains: Sequence[str],
    *,
    device=None,
    experts=None,
    after_forward: Callable[[dict[str, torch.Tensor], ForwardContext], None] | None = None,
    forward: Callable | None = None,
) -> dict[str, DomainLoss]:
    """Token-weighted mean NLL per domain over ``batches`` (from :func:`eval_batches`).

    The model runs as it is: wrap the call in :func:`srde_core.evaluate.evaluation_state` to pick
    base or SRDE. With ``experts`` (the attached handle), each forward runs in the forward context
    the core builds for it (``experts.make_context(batch, "eval")``: ids, mask, domain ids,
    difficulty, plugins' ``srde_forward_context``), and ``after_forward(batch, context)`` is called after it (with
    the batch on ``device``), e.g. to count the routings the context recorded. ``forward(fn)``
    runs ``fn(model)`` (an engine's forward-only mode, :meth:`Engine.forward_only`; default: a
    plain call).
    """
    device = device if device is not None else next(model.parameters()).device
    sums = torch.zeros(len(domains), dtype=torch.float64, device=device)
    counts = torch.zeros(len(domains), dtype=torch.long, device=device)
    for cpu_batch in batches:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        context = experts.make_context(batch, "eval") if experts is not None else ForwardContext.from_batch(batch, "eval")
        with experts.forward_context(context) if experts is not None else contextlib.nullcontext():
            nll, domain_ids = (forward or (lambda fn: fn(model)))(lambda m: next_token_nll(m, batch))
        if after_forward is not None:
            after_forward(batch, context)
        sums.index_add_(0, domain_ids, nll.double())
        counts.index_add_(0, domain_ids, torch.ones_like(domain_ids))
    return {
        d: DomainLoss(d, float(sums[i]), int(counts[i]))
        for i, d in enumerate(domains)
    }


def overall_loss(losses: dict[str, DomainLoss]) -> DomainLoss:
    """All domains together, token-weighted (what one training-style loss over the rows gives)."""
    return DomainLoss("all", sum(x.nll_sum for x in losses.values()), sum(x.tokens for x in losses.values()))
