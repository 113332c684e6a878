"""Position selectors for sparse deltas: largest |W| (`magnitude`) and uniform random (`random`).

The selectors themselves live in :mod:`srde_plugins.position_selectors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params

if TYPE_CHECKING:  # torch is imported when a selector is built, not when plugins are listed
    from srde_plugins.position_selectors import MagnitudeSelector, RandomSelector


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


def make_magnitude_selector(params: MagnitudeSelectorParams, **_context) -> MagnitudeSelector:
    """Positions of the largest |W| (shared by all experts, or interleaved by rank)."""
    from srde_plugins.position_selectors import MagnitudeSelector

    return MagnitudeSelector(params.assignment)


def make_random_selector(params: NoParams, **_context) -> RandomSelector:
    """Uniformly random positions per expert, from the run's seeded generator."""
    from srde_plugins.position_selectors import RandomSelector

    return RandomSelector()


@hookimpl
def srde_register(registry):
    registry.add(
        "selector",
        "magnitude",
        make_magnitude_selector,
        MagnitudeSelectorParams,
        "Positions of the largest |W|: shared by all experts, or dealt out by rank (interleaved).",
    )
    registry.add(
        "selector",
        "random",
        make_random_selector,
        NoParams,
        "Uniformly random positions per expert, drawn from the run's seeded generator.",
    )
