"""The dense reference of an SRDE MLP: the definition of what every fast path must compute.

For each token ``t``, with the experts ``e_tk`` and gate weights ``w_tk`` the layer's router and
combine step give (one decision per token, shared by the three projections), every projection with
a bank computes, with dense per-expert deltas materialised from ``bank.delta_weight``,

    out_t = combine.merge(W x_t + b,  sum_k w_tk * dW_{e_tk} x_t)

and the token goes through the plain gated MLP ``down(act(gate(x)) * up(x))`` with those
projections. A bank whose size varies per token (``bank.token_budgets``, dynamic sparsity) gives
token ``t`` the delta ``bank.delta_weight(e, budget=b_t)`` of its budget; a bank whose deltas depend
on the base weight (``bank.weight_dependent``) gets this layer's live ``W`` (``weight=W``). With the default combine step this is ``(W + sum_k w_tk dW_{e_tk}) x_t``. Nothing
here is fast. Tests compare every delta type, selector, router, combine step and kernel against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srde_core.model.components import BankCall
from srde_core.model.context import ForwardContext
from srde_core.model.layer import PROJECTIONS, SRDEMLP


def compute_dtype(mlp: SRDEMLP, x: torch.Tensor) -> torch.dtype:
    """The dtype the reference works in: the widest of the input, base weights and deltas, and at
    least float32 (so a bfloat16 model is checked against float32 arithmetic)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    for name in PROJECTIONS:
        dtype = torch.promote_types(dtype, getattr(mlp.base, name).weight.dtype)
    for p in mlp.banks.parameters():
        if p.is_floating_point():
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def dense_reference(mlp: SRDEMLP, hidden: torch.Tensor, context: ForwardContext | None = None) -> torch.Tensor:
    """``mlp(hidden)`` computed the slow, obvious way; differentiable in everything ``mlp`` is.

    Routes with ``mlp.route`` (recording the routing in ``context`` as a forward does) and returns
    ``[..., hidden]`` in :func:`compute_dtype`. A disabled ``mlp`` gives the base MLP.
    """
    dtype = compute_dtype(mlp, hidden)
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    context = context if context is not None else (mlp.context.current or ForwardContext())
    routing = mlp.route(x, context) if mlp.enabled else None
    x = x.to(dtype)

    def base_parts(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        linear = getattr(mlp.base, name)
        bias = None if linear.bias is None else linear.bias.to(dtype)
        return linear.weight.to(dtype), bias

    parts = {name: base_parts(name) for name in PROJECTIONS}
    def dense_delta(name: str, expert: int, **kwargs) -> torch.Tensor:
        """An expert's dense delta; a weight-dependent bank's from this layer's live weight."""
        bank = mlp.banks[name]
        if bank.weight_dependent:
            kwargs["weight"] = parts[name][0]
        return bank.delta_weight(expert, **kwargs).to(dtype)

    deltas = {}  # projection -> [E, out, in]: every expert's dense delta
    if routing is not None:
        for name, bank in mlp.banks.items():
            deltas[name] = torch.stack([dense_delta(name, e) for e in range(bank.num_experts)])

    budgeted = {}  # (projection, expert, budget) -> dense delta at that budget

    def delta_of(name: str, expert: int, budget: float | None) -> torch.Tensor:
        if budget is None:
            return deltas[name][expert]
        key = (name, expert, budget)
        if key not in budgeted:
            budgeted[key] = dense_delta(name, expert, budget=budget)
        return budgeted[key]

    def project(name: str, v: torch.Tensor) -> torch.Tensor:
        """The projection of every token ``v[t]`` (``[T, in]``), one token at a time."""
        out = F.linear(v, *parts[name])
        if name not in deltas:
            return out
        budgets = mlp.banks[name].token_budgets(v, BankCall(routing, context))
        rows = []
        for t in range(v.shape[0]):
            budget = None if budgets is None else float(budgets[t])
            delta = torch.zeros_like(out[t])
            for k in range(routing.top_k):
                expert = int(routing.experts[t, k])
                delta = delta + routing.weights[t, k].to(dtype) * (delta_of(name, expert, budget) @ v[t])
            rows.append(mlp.combine.merge(out[t][None], delta[None], name)[0])
        return torch.stack(rows) if rows else out

    h = mlp.base.act_fn(project("gate_proj", x)) * project("up_proj", x)
    y = project("down_proj", h)
    return y.reshape(*shape[:-1], y.shape[-1])
