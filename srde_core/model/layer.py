"""The SRDE MLP: a frozen gated MLP whose weights get per-token routed deltas.

    g = x W_g^T + sum_k w_k x dW_g,k^T        (gate_proj)
    u = x W_u^T + sum_k w_k x dW_u,k^T        (up_proj)
    h = act(g) * u
    y = h W_d^T + sum_k w_k h dW_d,k^T        (down_proj)

with ONE routing decision (experts e_k, weights w_k) per token, shared by the three projections.
The base projections run once for all tokens; each delta bank adds its term on top.
"""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.components import DeltaBank
from srde_core.model.routing import Router

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SRDEMLP(nn.Module):
    """Wraps a frozen HF gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)."""

    def __init__(self, base: nn.Module, router: Router, banks: dict[str, DeltaBank]):
        super().__init__()
        unknown = set(banks) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown projections {sorted(unknown)}; expected a subset of {PROJECTIONS}")
        self.base = base
        self.router = router
        self.banks = nn.ModuleDict(banks)
        self.enabled = True

    def _project(self, name: str, x: torch.Tensor, routing) -> torch.Tensor:
        out = getattr(self.base, name)(x)
        if self.enabled and name in self.banks:
            out = out + self.banks[name](x, routing).to(out.dtype)
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        routing = self.router(x) if self.enabled else None
        gate = self._project("gate_proj", x, routing)
        up = self._project("up_proj", x, routing)
        h = self.base.act_fn(gate) * up
        y = self._project("down_proj", h, routing)
        if routing is not None:
            routing.scratch.clear()  # routing outlives the forward on router.last; its scratch must not
        return y.reshape(*shape[:-1], y.shape[-1])
