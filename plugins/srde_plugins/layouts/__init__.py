"""Expert layouts: `uniform` (the same experts in each chosen layer) and `depth` (experts and top-k by depth).

A layout decides which decoder layers get experts, how many, the top-k of each, and which layers
share one expert bank (cross-layer sharing: one set of deltas, a router per layer, saved once).
Both layouts take the same sharing options: ``share_every = 2`` (adjacent layers in groups of 2),
``share_groups = [[0, 1], [2, 3, 4]]`` (explicit groups) or ``share_across_layers = true`` (one bank).
Layers that share a bank must have the same number of experts.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, model_validator

from srde_core.hookspecs import hookimpl
from srde_core.params import Params


class SharingParams(Params):
    """Cross-layer sharing options, common to every built-in layout."""

    share_across_layers: bool = Field(
        False, description="all chosen layers share one expert bank (each keeps its own router)"
    )
    share_every: int = Field(
        1, ge=1, description="adjacent chosen layers share a bank in groups of this many (1: no sharing)"
    )
    share_groups: list[list[int]] = Field(
        default_factory=list,
        description="explicit groups of layer indices that share a bank (negative counts from the end)",
    )

    @model_validator(mode="after")
    def _one_way_of_sharing(self) -> "SharingParams":
        ways = [self.share_across_layers, self.share_every > 1, bool(self.share_groups)]
        if sum(ways) > 1:
            raise ValueError("use one of share_across_layers, share_every and share_groups")
        if any(not group for group in self.share_groups):
            raise ValueError("share_groups must not contain an empty group")
        return self


class UniformLayoutParams(SharingParams):
    """Arguments of the ``uniform`` layout."""

    num_experts: int = Field(8, ge=1, description="experts per layer")
    top_k: int = Field(2, ge=1, description="experts each token uses (at most num_experts)")
    layers: Union[list[int], Literal["all"]] = Field(
        "all",
        description="decoder layer indices that get experts (negative counts from the end), or 'all'",
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> "UniformLayoutParams":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("layers must name at least one layer (or be 'all')")
        return self


class DepthStage(Params):
    """The layers whose relative depth ``(layer + 0.5) / num_layers`` is below ``until`` (and above
    the previous stage's) get ``num_experts`` experts, top ``top_k``; 0 experts: no experts there."""

    until: float = Field(gt=0.0, le=1.0, description="end of the stage as a fraction of depth")
    num_experts: int = Field(ge=0, description="experts per layer in this stage (0: none)")
    top_k: int = Field(1, ge=1, description="experts each token uses")


class DepthLayoutParams(SharingParams):
    """Arguments of the ``depth`` layout: stages as fractions of depth, so one recipe fits any model."""

    stages: list[DepthStage] = Field(
        default_factory=lambda: [
            DepthStage(until=0.25, num_experts=4, top_k=1),
            DepthStage(until=0.75, num_experts=8, top_k=2),
            DepthStage(until=1.0, num_experts=4, top_k=1),
        ],
        description="stages in order of depth; the default is 4/8/4 experts on the first quarter, middle half, last quarter",
    )

    @model_validator(mode="after")
    def _stages(self) -> "DepthLayoutParams":
        ends = [s.until for s in self.stages]
        if not ends or ends != sorted(set(ends)) or ends[-1] != 1.0:
            raise ValueError("stages need strictly increasing `until` values ending at 1.0")
        for stage in self.stages:
            if stage.num_experts and stage.top_k > stage.num_experts:
                raise ValueError(f"a stage has top_k ({stage.top_k}) > num_experts ({stage.num_experts})")
        return self


@hookimpl
def srde_register(registry):
    registry.add(
        "layout", "uniform", "srde_plugins.layouts.uniform:UniformLayout", UniformLayoutParams,
        "The same num_experts and top_k in each chosen layer; cross-layer bank sharing by groups.",
    )
    registry.add(
        "layout", "depth", "srde_plugins.layouts.depth:DepthLayout", DepthLayoutParams,
        "Experts and top-k by depth (stages as fractions of depth: 4/8/4 by default); bank sharing by groups.",
    )
