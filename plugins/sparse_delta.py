"""Sparse delta experts: learned value x sigmoid(importance) at a few selected weight positions.

For a frozen weight ``W`` of shape ``(out, in)``, expert ``e`` owns ``P = round(density * out * in)``
flat positions ``positions[e]`` (chosen once by the recipe's selector), a learned value ``v`` and a
learned importance logit ``s`` per position. Its delta is

    dW_e[positions[e, j]] = v[e, j] * sigmoid(s[e, j])        and 0 everywhere else.

Values start at 0, so an untrained bank leaves the base model unchanged. Importance starts at
``init_importance`` (default 0.0: sigmoid 0.5, where the importance gradient is largest, so a
position can become more or less important from the first steps on). Training updates ``values``
and ``importance``; the positions are a buffer saved with the adapter.

The bank is :class:`srde_plugins.sparse_bank.SparseDeltaBank`; the routed product runs through
per-expert CSR kernels (:mod:`srde_plugins.sparse_kernels`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import Params

if TYPE_CHECKING:  # torch is imported when the delta type is built, not when plugins are listed
    from srde_plugins.sparse_bank import SparseDelta


class SparseDeltaParams(Params):
    """Arguments of the ``sparse`` delta type."""

    density: float = Field(
        0.01, gt=0.0, le=1.0, description="fraction of each weight's entries an expert may change"
    )
    init_importance: float = Field(
        0.0,
        ge=-20.0,
        le=20.0,
        description="initial importance logit of every position (its weight is sigmoid of this)",
    )
    cache_inputs: bool = Field(
        True,
        description=(
            "keep each expert's gathered input from the forward pass for the backward pass "
            "(faster; saves top_k copies of each projection's input). False gathers it again"
        ),
    )


def make_sparse_delta(params: SparseDeltaParams, **_context) -> SparseDelta:
    """Per-expert deltas on selected weight positions: value x sigmoid(importance)."""
    from srde_plugins.sparse_bank import SparseDelta

    return SparseDelta(params)


@hookimpl
def srde_register(registry):
    registry.add(
        "delta",
        "sparse",
        make_sparse_delta,
        SparseDeltaParams,
        "Per-expert deltas at selector-chosen weight positions: value x sigmoid(importance).",
    )
