"""Sparse delta experts: learned value x sigmoid(importance) at a few selected weight positions.

For a frozen weight ``W`` of shape ``(out, in)``, expert ``e`` owns ``P = round(density * out * in)``
flat positions ``positions[e]`` (chosen once by the recipe's selector), a learned value ``v`` and a
learned importance logit ``s`` per position. Its delta is

    dW_e[positions[e, j]] = v[e, j] * sigmoid(s[e, j])        and 0 everywhere else.

Values start at 0, so an untrained bank leaves the base model unchanged. Importance starts at
``init_importance`` (default 0.0: sigmoid 0.5, where the importance gradient is largest, so a
position can become more or less important from the first steps on). Training updates ``values``
and ``importance``; the positions are a buffer saved with the adapter.

The positions come from a selector, nested in the delta's table:
``delta = { name = "sparse", density = 0.01, selector = { name = "magnitude" } }``. This package
also registers the position selectors ``magnitude`` (largest |W|) and ``random``.

Layout of the family: this module registers (no torch); :mod:`.bank` holds the bank,
:mod:`.kernels` the per-expert CSR kernels and :mod:`.selectors` the selectors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params, component
from srde_core.registry import ComponentChoice


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
    selector: ComponentChoice = component("selector", "magnitude", "which positions each expert owns")


class MagnitudeSelectorParams(Params):
    """Arguments of the ``magnitude`` selector."""

    assignment: Literal["shared", "interleaved"] = Field(
        "shared",
        description=(
            "'shared': every expert gets the same top-|W| positions (experts differ in their "
            "values only); 'interleaved': the top num_experts*count positions are dealt out by "
            "rank (rank r goes to expert r mod num_experts), so experts are disjoint and each "
            "gets a similar magnitude profile"
        ),
    )


@hookimpl
def srde_register(registry):
    here = "srde_plugins.deltas.sparse"
    registry.add(
        "delta", "sparse", f"{here}.bank:SparseDelta", SparseDeltaParams,
        "Per-expert deltas at selector-chosen weight positions: value x sigmoid(importance).",
    )
    registry.add(
        "selector", "magnitude", f"{here}.selectors:MagnitudeSelector.from_params", MagnitudeSelectorParams,
        "Positions of the largest |W|: shared by all experts, or dealt out by rank (interleaved).",
    )
    registry.add(
        "selector", "random", f"{here}.selectors:RandomSelector.from_params", NoParams,
        "Uniformly random positions per expert, drawn from the run's seeded generator.",
    )
