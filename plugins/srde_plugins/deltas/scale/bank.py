"""The bank of the ``scale`` delta type (registered by :mod:`srde_plugins.deltas.scale`)."""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.components import BankCall, DeltaBank, DeltaType
from srde_plugins.deltas.scale import ScaleDeltaParams


class ScaleDeltaBank(DeltaBank):
    """``E`` scale vectors ``s_e`` of one projection: ``[E, in]`` (input side) or ``[E, out]``.

    Input side: a token's term is ``(x * sum_k w_k s_{e_k}) W^T`` (one product with the live weight,
    gathered where the engine shards it); output side: ``(sum_k w_k s_{e_k}) * (x W^T)``, from the
    layer's base output.
    """

    trainable_names = ("scales",)
    compile_traceable = False
    weight_dependent = True

    def __init__(self, out_features: int, in_features: int, num_experts: int, side: str, device=None):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.side = side
        self.reads_weight = side == "input"
        width = in_features if side == "input" else out_features
        self.scales = nn.Parameter(torch.zeros(num_experts, width, device=device))

    def gated(self, call: BankCall, dtype: torch.dtype) -> torch.Tensor:
        """``[T, width]``: each token's ``sum_k w_k s_{e_k}``."""
        routing = call.routing
        return (routing.weights.to(dtype).unsqueeze(-1) * self.scales.to(dtype)[routing.experts]).sum(1)

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        scale = self.gated(call, x.dtype)
        if self.side == "input":
            return call.linear(x * scale)
        wx = call.base if call.bias is None else call.base - call.bias
        return scale * wx.to(x.dtype)

    def delta_weight(self, expert: int, *, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("the scale delta is a function of the layer's weight: delta_weight(e, weight=W)")
        s = self.scales[expert].to(weight.dtype)
        return weight * s[None, :] if self.side == "input" else s[:, None] * weight

    def gram(self) -> torch.Tensor:
        """The inner products of the experts' scale vectors (their deltas up to the layer's ``W``)."""
        return self.scales @ self.scales.T


class ScaleDelta(DeltaType):
    """The ``scale`` delta type."""

    def __init__(self, params: ScaleDeltaParams):
        self.side = params.side

    def make_bank(self, weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> ScaleDeltaBank:
        out_features, in_features = weight.shape
        device = "meta" if weight.device.type == "meta" else None
        return ScaleDeltaBank(out_features, in_features, num_experts, self.side, device)
