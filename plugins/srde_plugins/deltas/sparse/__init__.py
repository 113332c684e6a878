"""Sparse delta experts: learned value x sigmoid(importance) at a few selected weight positions.

For a frozen weight ``W`` of shape ``(out, in)``, expert ``e`` owns ``P = round(density * out * in)``
flat positions ``positions[e]`` (chosen once by the recipe's selector), a learned value ``v`` and a
learned importance logit ``s`` per position. Its delta is

    dW_e[positions[e, j]] = v[e, j] * sigmoid(s[e, j])        and 0 everywhere else.

(``importance = "entry"``, the default; ``"expert"`` keeps one logit per expert and weight,
``"none"`` none: ``dW_e[positions[e, j]] = v[e, j]``.) Values start at 0, so an untrained bank
leaves the base model unchanged. Importance starts at
``init_importance`` (default 0.0: sigmoid 0.5, where the importance gradient is largest, so a
position can become more or less important from the first steps on). Training updates ``values``
and ``importance``; the positions are a buffer saved with the adapter.

The positions come from a selector, nested in the delta's table:
``delta = { name = "sparse", density = 0.01, selector = { name = "magnitude" } }``. This package
also registers the position selectors ``magnitude`` (largest |W|) and ``random``, and the learned
ones ``gumbel_topk`` (a straight-through Gumbel top-k mask over candidates, then hardened) and
``spiel`` (drop-and-grow toward large gradients); after every optimiser step the core's step
driver gives each trained bank's selector its ``after_step``.

Layout of the family: this module registers (no torch); :mod:`.bank` holds the bank,
:mod:`.kernels` the per-expert CSR kernels, :mod:`.block` the bank and kernel of block positions
(``block = [16, 16]``), :mod:`.selectors` the fixed selectors and :mod:`.learned` the learned ones.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

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
    importance: Literal["entry", "expert", "none"] = Field(
        "entry",
        description=(
            "the learned importance logits that scale the values: 'entry' (one per entry or block "
            "entry: value x sigmoid(importance)), 'expert' (one per expert and weight: the expert's "
            "values x sigmoid(its logit)), 'none' (values only: dW = value)"
        ),
    )
    cache_inputs: bool = Field(
        True,
        description=(
            "keep each expert's gathered input from the forward pass for the backward pass "
            "(faster; saves top_k copies of each projection's input). False gathers it again"
        ),
    )
    selector: ComponentChoice = component("selector", "magnitude", "which positions each expert owns")
    block: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 1],
        min_length=2,
        max_length=2,
        description=(
            "[rows, cols] of the dense blocks an expert owns ([1, 1]: single entries); the selector "
            "ranks the grid of block norms (learned selectors move whole blocks), density still counts entries"
        ),
    )


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


def _phase_point(value: int | float) -> int | float:
    """A point of a phase: an int is a step (>= 1), a float a fraction of the phase in (0, 1]."""
    if isinstance(value, bool) or (isinstance(value, int) and value < 1):
        raise ValueError("a step must be an integer >= 1")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError("a fraction of the phase must be in (0, 1]; write a step as an integer")
    return value


class GumbelTopKParams(Params):
    """Arguments of the ``gumbel_topk`` selector."""

    candidates: float = Field(
        4.0, ge=1.0, description="candidate positions per bank, as a multiple of the final count (largest |W|)"
    )
    temperature: ComponentChoice = component(
        "schedule", {"name": "exponential", "start": 1.0, "end": 0.1},
        "temperature of the sigmoid relaxation in the backward pass, from the phase's start to harden_at",
    )
    value_gradient: Literal["candidates", "chosen"] = Field(
        "candidates",
        description=(
            "which values learn before hardening: 'candidates' (the values' gradient passes straight "
            "through the mask, so an unchosen candidate can gain value and then logit) or 'chosen' "
            "(only the entries the mask picked this step)"
        ),
    )
    harden_at: int | float = Field(
        0.5, description="when each expert keeps only its chosen positions: a fraction of the phase (float) or a step (int)"
    )

    _harden_at = field_validator("harden_at")(_phase_point)


class SpielParams(Params):
    """Arguments of the ``spiel`` selector."""

    start: ComponentChoice = component("selector", "magnitude", "where the entries start")
    every: int = Field(20, ge=1, description="optimiser steps between two drop-and-grow updates")
    fraction: float = Field(0.1, gt=0.0, le=1.0, description="fraction of each expert's entries moved per update")
    until: int | float = Field(
        0.75, description="last update: a fraction of the phase (float) or a step (int)"
    )
    grow: Literal["candidates", "dense"] = Field(
        "candidates",
        description=(
            "where the gradient that picks new entries is measured: 'candidates' (SpIEL-AG: at "
            "`candidates` x moved entries per expert, chosen once per window as `pool` says, "
            "accumulated until the next update) or 'dense' (every position, in the update step "
            "only: an [experts, out, in] buffer, for small models)"
        ),
    )
    candidates: float = Field(
        4.0, ge=1.0, description="grow = 'candidates': candidate positions per expert, in multiples of the entries moved"
    )
    pool: Literal["gradient", "uniform"] = Field(
        "gradient",
        description=(
            "grow = 'candidates': how the candidates are chosen; 'gradient' (SpIEL-AG): the unowned "
            "positions of largest gradient in the first step after each update (an [experts, out, in] "
            "buffer during that step); 'uniform': drawn at random (no dense buffer at any step)"
        ),
    )

    _until = field_validator("until")(_phase_point)


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
    registry.add(
        "selector", "gumbel_topk", f"{here}.learned:GumbelTopK.from_params", GumbelTopKParams,
        "Learned: straight-through Gumbel top-k over top-|W| candidates, hardened to the final count.",
    )
    registry.add(
        "selector", "spiel", f"{here}.learned:SpIEL.from_params", SpielParams,
        "Learned: drop the entries of smallest |delta|, grow where the accumulated gradient is largest (SpIEL).",
    )
