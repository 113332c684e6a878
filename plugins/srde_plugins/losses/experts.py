"""Expert-specific losses (registered by :mod:`srde_plugins.losses`), averaged over SRDE layers.

- ``specialization``: minus the mutual information between the routing distribution and the domain
  label, ``-I(E; D) / log E``, from the router probabilities of the real (non-padding) tokens:
  ``p(e|d)`` is the mean probability of tokens of domain ``d``, ``p(e) = sum_d p(d) p(e|d)``,
  ``I = H(p(e)) - sum_d p(d) H(p(e|d))``. Differentiable through the probabilities; it rewards
  routers whose choice tells the domain, while ``H(p(e))`` in it keeps the overall load spread
  (unlike a term that just lowers routing entropy). Domain ids come from the forward context.
  Exact under data parallelism: the per-domain sums of probabilities and the token counts are
  summed over processes before the (nonlinear) information is taken, and each process back-
  propagates through its own share of the sums, scaled so that the engine's mean over processes is
  the global batch's gradient. Under gradient accumulation it is each micro-batch's own value (a
  function of a whole batch cannot be split into micro-batch terms): the steps' mean of the
  micro-batches' information, like a batch-level statistic of a smaller batch.
- ``diversity``: the mean pairwise squared cosine similarity of the experts' deltas in each bank
  (``DeltaBank.gram``), over every bank of the model (shared banks once; ``inputs.banks``): experts
  that change the weights along the same direction (either sign) are penalised; 0 when every pair
  is orthogonal.
"""

from __future__ import annotations

import math

import torch

from srde_core.model.routing import Routing
from srde_core.train.losses import LossInputs


def specialization(params):
    """-I(expert; domain) / log(E) from router probabilities (real tokens), mean over layers."""

    def loss(inputs: LossInputs) -> torch.Tensor:
        if not inputs.routings or inputs.context is None or inputs.context.domain_ids is None:
            return inputs.hidden.new_zeros((), dtype=torch.float32)
        value = torch.stack([_negative_mi(inputs, r) for r in inputs.routings]).mean()
        if not inputs.dist.distributed:
            return value
        # the same global value on every process; the engine averages the processes' gradients, and
        # each holds the gradient through its own tokens only: scale that part by the world size
        world = inputs.dist.world_size
        return world * value - (world - 1) * value.detach()

    return loss


def _negative_mi(inputs: LossInputs, routing: Routing) -> torch.Tensor:
    tokens = routing.probs.shape[0]
    domains = inputs.context.per_token(inputs.context.domain_ids, tokens).to(routing.probs.device)
    mask = inputs.batch.get("attention_mask")
    keep = mask.reshape(-1).bool() if mask is not None and mask.numel() == tokens else torch.ones(tokens, dtype=torch.bool, device=domains.device)
    probs, domains = routing.probs[keep], domains[keep]
    num_domains = max(inputs.num_domains, int(domains.max()) + 1 if domains.numel() else 1)
    dist = inputs.dist
    if dist.distributed:  # one shape on every process: the sum of theirs is at least the largest
        num_domains = int(dist.all_sum(torch.tensor(num_domains)))
    one_hot = torch.nn.functional.one_hot(domains, num_domains).to(probs.dtype)  # [N, D]
    count = one_hot.sum(0)  # tokens per domain
    sums = one_hot.T @ probs  # [D, E]
    if dist.distributed:  # the global batch's sums, the gradient through this process's share
        sums = sums + (dist.all_sum(sums) - sums.detach())
        count = dist.all_sum(count)
    present = count > 0
    p_e_given_d = sums[present] / count[present, None]  # [D', E]
    p_d = count[present] / count.sum()
    p_e = p_d @ p_e_given_d
    mi = _entropy(p_e) - (p_d * _entropy(p_e_given_d)).sum()
    return -mi / math.log(routing.num_experts) if routing.num_experts > 1 else -mi


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def diversity(params):
    """Mean pairwise squared cosine similarity of the experts' deltas, over every bank."""

    def loss(inputs: LossInputs) -> torch.Tensor:
        banks = inputs.banks
        if not banks:
            return inputs.hidden.new_zeros((), dtype=torch.float32)
        return torch.stack([_mean_cosine(bank.gram()) for bank in banks]).mean()

    return loss


def _mean_cosine(gram: torch.Tensor) -> torch.Tensor:
    experts = gram.shape[0]
    if experts < 2:
        return gram.new_zeros(())
    norms = gram.diagonal().clamp_min(1e-12).sqrt()
    cosine = gram / (norms[:, None] * norms[None, :])
    off_diagonal = ~torch.eye(experts, dtype=torch.bool, device=gram.device)
    return cosine[off_diagonal].pow(2).mean()
