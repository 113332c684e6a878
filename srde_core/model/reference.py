"""The dense reference of an SRDE MLP: the definition of what every fast path must compute.

For each token ``t``, with the router's experts ``e_tk`` and gate weights ``w_tk`` (one decision
per token, shared by the three projections), every projection with a bank gets the effective weight

    W_eff(t) = W + sum_k w_tk * bank.delta_weight(e_tk)

and the token goes through the plain gated MLP ``down(act(gate(x)) * up(x))`` with those weights.
Nothing here is fast: it materialises a full weight per token and projection. Tests compare every
delta type, selector and kernel against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def dense_reference(mlp: SRDEMLP, hidden: torch.Tensor) -> torch.Tensor:
    """``mlp(hidden)`` computed the slow, obvious way; differentiable in everything ``mlp`` is.

    Routes with ``mlp.router`` (so ``mlp.router.last`` is overwritten, as in a forward pass) and
    returns ``[..., hidden]`` in :func:`compute_dtype`. A disabled ``mlp`` gives the base MLP.
    """
    dtype = compute_dtype(mlp, hidden)
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    routing = mlp.router(x) if mlp.enabled else None
    x = x.to(dtype)

    def base_parts(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        linear = getattr(mlp.base, name)
        bias = None if linear.bias is None else linear.bias.to(dtype)
        return linear.weight.to(dtype), bias

    parts = {name: base_parts(name) for name in PROJECTIONS}
    deltas = {}  # projection -> [E, out, in]: every expert's dense delta
    if routing is not None:
        for name, bank in mlp.banks.items():
            deltas[name] = torch.stack([bank.delta_weight(e).to(dtype) for e in range(bank.num_experts)])

    def effective_weight(name: str, t: int) -> torch.Tensor:
        weight = parts[name][0]
        if name not in deltas:
            return weight
        for k in range(routing.top_k):
            expert = int(routing.experts[t, k])
            weight = weight + routing.weights[t, k].to(dtype) * deltas[name][expert]
        return weight

    rows = []
    for t in range(x.shape[0]):
        w_gate, w_up, w_down = (effective_weight(name, t) for name in PROJECTIONS)
        gate = F.linear(x[t], w_gate, parts["gate_proj"][1])
        up = F.linear(x[t], w_up, parts["up_proj"][1])
        h = mlp.base.act_fn(gate) * up
        rows.append(F.linear(h, w_down, parts["down_proj"][1]))
    y = torch.stack(rows) if rows else x.new_zeros(0, parts["down_proj"][0].shape[0])
    return y.reshape(*shape[:-1], y.shape[-1])
