"""Routing analysis: which experts serve which domains.

For every SRDE layer, an expert x domain load matrix counts the routed slots over the real (non-pad)
eval tokens: a token counts once for each of the top-k experts its router chose (``Routing.routed``:
also under a combine step that applies every expert), so a layer's matrix sums to
``real tokens * top_k``. From a matrix:

- an expert's *purity* is the largest share one domain has of its load;
- the overall purity is the load-weighted mean of the experts' purities;
- the *baseline purity* is what a domain-blind router gets (every expert sees the domain mix of the
  tokens): the largest domain share of the tokens. Purity above it means specialisation;
- the normalised mutual information between expert and domain (0: independent, 1: each expert
  serves one domain and each domain one expert), arithmetic-mean normalisation.

Across layers there are two views: the matrices summed by expert index (the same delta where layers
share a bank, otherwise a compact picture), and every (layer, expert) as an expert of its own,
whose purity is the mean of the layers' purities.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from srde_core.model.context import ForwardContext


def expert_purity(counts: torch.Tensor) -> list[float | None]:
    """Per expert (row of ``counts [E, D]``): the largest domain share of its load; ``None`` for an
    expert that got no token."""
    counts = counts.double()
    load = counts.sum(dim=1)
    top = counts.max(dim=1).values if counts.shape[1] else torch.zeros_like(load)
    return [float(t / n) if n > 0 else None for t, n in zip(top, load)]


def purity(counts: torch.Tensor) -> float:
    """Load-weighted mean of the experts' purities (= sum of row maxima / total); NaN if empty."""
    counts = counts.double()
    total = counts.sum()
    return float(counts.max(dim=1).values.sum() / total) if total > 0 else math.nan


def baseline_purity(counts: torch.Tensor) -> float:
    """The purity of a domain-blind router: the largest domain share of all routed slots."""
    counts = counts.double()
    total = counts.sum()
    return float(counts.sum(dim=0).max() / total) if total > 0 else math.nan


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def normalized_mutual_information(counts: torch.Tensor) -> float:
    """NMI between expert and domain of a routed slot, ``2 I / (H(expert) + H(domain))``; 0 when
    either is constant (nothing to explain), NaN when ``counts`` is empty."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return math.nan
    joint = counts / total
    h_expert, h_domain = _entropy(joint.sum(dim=1)), _entropy(joint.sum(dim=0))
    mutual = h_expert + h_domain - _entropy(joint.reshape(-1))
    return 2 * mutual / (h_expert + h_domain) if h_expert > 0 and h_domain > 0 else 0.0


def summarize(counts: torch.Tensor, domains: Sequence[str]) -> dict:
    """JSON-ready view of one load matrix: counts, shares per expert, purities, baseline, NMI."""
    counts = counts.long().cpu()
    load = counts.sum(dim=1)
    total = int(load.sum())
    return {
        "domains": list(domains),
        "counts": counts.tolist(),
        "load_share": [int(n) / total if total else None for n in load],
        "expert_purity": expert_purity(counts),
        "purity": purity(counts),
        "baseline_purity": baseline_purity(counts),
        "nmi": normalized_mutual_information(counts),
        "slots": total,
    }


class RoutingCounter:
    """Accumulates each SRDE layer's expert x domain load matrix over forwards.

    Call :meth:`observe` with the batch and the forward context after each forward with the experts
    enabled; it reads every SRDE layer's routing from the context (one row per token of the
    ``[B, S]`` batch, pad tokens included, which the attention mask drops here). ``tokens="answer"``
    counts only the labelled tokens (``labels != -100``: the answers under ``loss_on = "answer"``),
    the positions that come after the prompt and so can know its domain; ``tokens="prompt"`` the
    other real tokens.
    """

    TOKENS = ("real", "answer", "prompt")

    def __init__(self, layers: Iterable[int], num_domains: int, tokens: str = "real"):
        if tokens not in self.TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(self.TOKENS)}, not {tokens!r}")
        self.layers = list(layers)
        self.num_domains = num_domains
        self.tokens = tokens
        self.counts: dict[int, torch.Tensor] = {}

    def observe(self, batch: Mapping[str, torch.Tensor], context: ForwardContext) -> None:
        mask = batch["attention_mask"].reshape(-1).bool()
        if self.tokens != "real":
            labelled = batch["labels"].reshape(-1) != -100
            mask = mask & (labelled if self.tokens == "answer" else ~labelled)
        domain = batch["domain_ids"][:, None].expand_as(batch["attention_mask"]).reshape(-1)[mask]
        for layer in self.layers:
            routing = context.routings.get(layer)
            if routing is None or routing.routed.shape[0] != mask.numel():
                raise RuntimeError(f"layer {layer}: the context holds no routing of this batch's forward")
            experts = routing.routed[mask]  # [N, k]: the router's choice
            cells = experts * self.num_domains + domain[:, None]
            size = routing.num_experts * self.num_domains
            found = torch.bincount(cells.reshape(-1), minlength=size).reshape(routing.num_experts, self.num_domains)
            self.counts[layer] = found + self.counts.get(layer, 0)

    def aggregate(self) -> torch.Tensor:
        """All layers summed per expert index (layers with fewer experts count as zero rows)."""
        if not self.counts:
            return torch.zeros(0, self.num_domains, dtype=torch.long)
        rows = max(c.shape[0] for c in self.counts.values())
        total = torch.zeros(rows, self.num_domains, dtype=torch.long)
        for c in self.counts.values():
            total[: c.shape[0]] += c.cpu()
        return total

    def stacked(self) -> torch.Tensor:
        """Every (layer, expert) as its own row, layers in order: the matrix whose purity is the
        slot-weighted mean of the layers' purities."""
        if not self.counts:
            return torch.zeros(0, self.num_domains, dtype=torch.long)
        return torch.cat([c.cpu() for _, c in sorted(self.counts.items())])

    def to_json(self, domains: Sequence[str]) -> dict:
        """``{"layers": {layer: summary}, "all_layers": summary of the summed matrix,
        "layer_experts": purity/baseline/NMI of the stacked matrix}`` (see :func:`summarize`)."""
        stacked = summarize(self.stacked(), domains)
        return {
            "layers": {str(layer): summarize(c, domains) for layer, c in sorted(self.counts.items())},
            "all_layers": summarize(self.aggregate(), domains),
            "layer_experts": {k: stacked[k] for k in ("purity", "baseline_purity", "nmi", "slots")},
        }
