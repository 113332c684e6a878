"""A token-id hash router (hash layers), written as a third-party plugin would write it."""

from __future__ import annotations

import torch

from srde_core.hookspecs import hookimpl
from srde_core.model.routing import Router, RouterType, Routing

#: (mode, shape of the ids) of every context the hook saw, in order.
SEEN: list[tuple[str, tuple[int, ...]]] = []


class HashRouter(Router):
    """Token ``t`` goes to experts ``(id_t * 2654435761 + j) mod E``, ``j < k``, with equal weights."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k

    def route(self, x, context):
        ids = context.token_ids(x.shape[0])
        if ids is None:
            raise ValueError(f"token_hash needs the token ids in the forward context (mode {context.mode})")
        first = (ids.to(x.device) * 2654435761) % self.num_experts
        experts = (first[:, None] + torch.arange(self.top_k, device=x.device)) % self.num_experts
        weights = torch.full(experts.shape, 1.0 / self.top_k, device=x.device, dtype=torch.float32)
        probs = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter(1, experts, 1.0 / self.top_k)
        return Routing(experts, weights, probs, probs.log().clamp_min(-30.0), self.num_experts)


class HashRouterType(RouterType):
    def make_router(self, hidden_size, num_experts, top_k, generator):
        return HashRouter(num_experts, top_k)


@hookimpl
def srde_register(registry):
    registry.add("router", "token_hash", lambda params: HashRouterType(), summary="Routes by a hash of the token id.")


@hookimpl
def srde_forward_context(context, batch, phase, run):
    SEEN.append((context.mode, tuple(context.input_ids.shape) if context.input_ids is not None else ()))
