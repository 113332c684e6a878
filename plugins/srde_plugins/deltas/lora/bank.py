"""The bank of the ``lora`` delta type (registered by :mod:`srde_plugins.deltas.lora`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from srde_core.model.components import BankCall, DeltaBank, DeltaType
from srde_plugins.deltas.lora import LoRADeltaParams


class LoRADeltaBank(DeltaBank):
    """``E`` rank-``r`` deltas of one ``(out, in)`` weight, stored side by side:
    ``lora_A`` ``[E r, in]`` (expert ``e`` owns rows ``e r .. e r + r``) and ``lora_B`` ``[out, E r]``."""

    trainable_names = ("lora_A", "lora_B")
    compile_traceable = True  # dense products and a scatter of the gate weights: fixed shapes

    def __init__(self, out_features: int, in_features: int, num_experts: int, params: LoRADeltaParams, generator: torch.Generator):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.rank = params.rank
        self.scale = params.alpha / params.rank
        width = num_experts * params.rank
        if params.init == "kaiming":  # what nn.Linear and PEFT use: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(in_features)
            a = torch.rand(width, in_features, generator=generator) * 2 * bound - bound
        else:
            a = torch.randn(width, in_features, generator=generator) / params.rank
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(out_features, width))

    def gates(self, call: BankCall, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """``[T, E r]``: each token's gate weight of expert ``e`` on expert ``e``'s ``r`` columns
        (0 for experts it is not routed to); shared by the projections of the layer."""
        key = ("lora-gates", dtype, self.num_experts, self.rank)
        cached = call.cache.get(key)
        if cached is None:
            routing = call.routing
            per_expert = routing.weights.new_zeros(tokens, self.num_experts)
            per_expert = per_expert.scatter_add(1, routing.experts, routing.weights).to(dtype)
            cached = per_expert.repeat_interleave(self.rank, dim=1)
            call.cache[key] = cached
        return cached

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        h = F.linear(x, self.lora_A.to(x.dtype))  # [T, E r]: every expert's down-projection at once
        h = h * self.gates(call, x.shape[0], x.dtype)
        return F.linear(h, self.lora_B.to(x.dtype)) * self.scale

    def _expert(self, e: int) -> slice:
        return slice(e * self.rank, (e + 1) * self.rank)

    def delta_weight(self, expert: int) -> torch.Tensor:
        part = self._expert(expert)
        return self.scale * self.lora_B[:, part] @ self.lora_A[part]

    def gram(self) -> torch.Tensor:
        """``<B_a A_a, B_b A_b> = sum((B_a^T B_b) * (A_a A_b^T))`` without dense deltas."""
        e, r = self.num_experts, self.rank
        bb = (self.lora_B.T @ self.lora_B).view(e, r, e, r)
        aa = (self.lora_A @ self.lora_A.T).view(e, r, e, r)
        return self.scale**2 * (bb * aa).sum(dim=(1, 3))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, rank={self.rank}"


class LoRADelta(DeltaType):
    def __init__(self, params: LoRADeltaParams):
        self.params = params

    def make_bank(self, weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> LoRADeltaBank:
        out_features, in_features = weight.shape
        return LoRADeltaBank(out_features, in_features, num_experts, self.params, generator).to(weight.device)
