"""The `full` delta: every expert owns a whole dense delta of the weight (a small-model baseline)."""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.components import BankCall, DeltaBank, DeltaType
from srde_example_plugin.params import FullParams


class FullBank(DeltaBank):
    """``deltas[e]`` is expert ``e``'s ``(out, in)`` delta, starting at zero."""

    trainable_names = ("deltas",)

    def __init__(self, out_features: int, in_features: int, num_experts: int, scale: float, device=None):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.scale = scale
        self.deltas = nn.Parameter(torch.zeros(num_experts, out_features, in_features, device=device))

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        routing = call.routing
        per_token = self.deltas.to(x.dtype)[routing.experts]  # [T, k, out, in]
        terms = torch.einsum("tkoi,ti->tko", per_token, x)
        return self.scale * (routing.weights.to(x.dtype).unsqueeze(-1) * terms).sum(1)

    def delta_weight(self, expert: int) -> torch.Tensor:
        return self.scale * self.deltas[expert]


class FullDelta(DeltaType):
    def __init__(self, params: FullParams):
        self.scale = params.scale

    def make_bank(self, weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> FullBank:
        device = "meta" if weight.device.type == "meta" else None
        return FullBank(*weight.shape, num_experts, self.scale, device)
