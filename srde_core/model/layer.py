"""The SRDE MLP: a frozen gated MLP whose weights get per-token routed deltas.

    g = merge(x W_g^T, sum_k w_k x dW_g,k^T)        (gate_proj)
    u = merge(x W_u^T, sum_k w_k x dW_u,k^T)        (up_proj)
    h = act(g) * u
    y = merge(h W_d^T, sum_k w_k h dW_d,k^T)        (down_proj)

with ONE routing decision (experts e_k, weights w_k) per token, shared by the three projections;
``merge`` is the combine step's (plain addition by default) and the weights are the ones the
combine step passes on. The base projections run once for all tokens; each delta bank adds its
term on top.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from srde_core.model.combine import CombineStep, WeightedSum
from srde_core.model.components import BankCall, DeltaBank, Gather
from srde_core.model.context import ContextSlot, ForwardContext
from srde_core.model.projections import PROJECTIONS, check_projections
from srde_core.model.routing import Router

__all__ = ["PROJECTIONS", "SRDEMLP"]


class SRDEMLP(nn.Module):
    """Wraps a frozen HF gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``).

    ``context`` is the slot through which the attached model hands every layer the forward
    context; a layer used on its own gets a private one.
    """

    def __init__(
        self,
        base: nn.Module,
        router: Router,
        banks: dict[str, DeltaBank],
        combine: CombineStep | None = None,
        *,
        layer: int = 0,
        context: ContextSlot | None = None,
        gather: Gather | None = None,
    ):
        super().__init__()
        check_projections(banks)
        self.base = base
        self.router = router
        self.banks = nn.ModuleDict(banks)
        self.combine = combine if combine is not None else WeightedSum()
        self.layer = layer
        self.context = context if context is not None else ContextSlot()
        #: Makes the engine's partitioned base weights readable (ZeRO-3); None: read as they are.
        self.gather = gather
        self.enabled = True

    def _term(self, name: str, call: BankCall, base: torch.Tensor):
        """The function ``(x, call) -> [T, out]`` giving projection ``name``'s expert term: its bank,
        or the bank run eagerly when it does not trace (``DeltaBank.compile_traceable``), with the
        base weight gathered around it when it reads it (``DeltaBank.reads_weight``) and the engine
        holds it partitioned (its shape is not the bank's). Returned
        rather than called so that, in a compiled layer, the graph break of an eager bank sits in
        :meth:`forward` itself: a break inside a nested call would break its caller's graph too.
        ``call`` gets the projection's name, live weight and bias, and its base output ``base``."""
        linear = getattr(self.base, name)
        call.projection, call.weight, call.bias, call.base = name, linear.weight, linear.bias, base
        bank = self.banks[name]
        if self.gather is not None and bank.reads_weight and tuple(linear.weight.shape) != (bank.out_features, bank.in_features):
            tensors = [linear.weight] + ([linear.bias] if linear.bias is not None else [])
            return partial(_gathered_bank, bank, self.gather, tensors)
        return bank if getattr(bank, "compile_traceable", False) else partial(_eager_bank, bank)

    def route(self, x: torch.Tensor, context: ForwardContext):
        """This layer's routing of the flat tokens ``x`` (router, then the combine step; a forced
        assignment from the context skips the combine step), recorded in ``context``."""
        routing = self.router(x, context, self.layer)
        if context.forced_for(self.layer) is None:  # a forced assignment is kept as it is
            routing = self.combine.weights(routing, x, context)
        context.record(self.layer, routing)
        return routing

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        gate, up = self.base.gate_proj(x), self.base.up_proj(x)
        banks = self.banks if self.enabled else {}
        if banks:
            context = self.context.current or ForwardContext()
            routing = self.route(x, context)
            shared = BankCall(routing, context, gather=self.gather)  # gate_proj and up_proj take the same input
            if "gate_proj" in banks:
                gate = self.combine.merge(gate, self._term("gate_proj", shared, gate)(x, shared), "gate_proj")
            if "up_proj" in banks:
                up = self.combine.merge(up, self._term("up_proj", shared, up)(x, shared), "up_proj")
        h = self.base.act_fn(gate) * up
        y = self.base.down_proj(h)
        if "down_proj" in banks:
            h_call = BankCall(routing, context, gather=self.gather)
            y = self.combine.merge(y, self._term("down_proj", h_call, y)(h, h_call), "down_proj")
        return y.reshape(*shape[:-1], y.shape[-1])


@torch.compiler.disable
def _eager_bank(bank: DeltaBank, x: torch.Tensor, call: BankCall) -> torch.Tensor:
    """A bank that does not trace (see ``DeltaBank.compile_traceable``), run eagerly: inside a
    compiled layer it is one graph break, and its host-side values (per-expert offsets) are never
    specialised on, so a new routing never recompiles the layer."""
    return bank(x, call)


@torch.compiler.disable
def _gathered_bank(bank: DeltaBank, gather: Gather, tensors: list[torch.Tensor], x: torch.Tensor, call: BankCall) -> torch.Tensor:
    """A bank that reads its layer's base weight, run while the engine gathers that weight."""
    with gather(tensors):
        return bank(x, call)
