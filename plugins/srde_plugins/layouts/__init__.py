"""Expert layouts: `uniform` (the same experts and top-k in each chosen layer, optional shared bank).

A layout decides which decoder layers get experts and which layers share one expert bank
(cross-layer sharing: one set of deltas, a router per layer).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, model_validator

from srde_core.hookspecs import hookimpl
from srde_core.params import Params


class UniformLayoutParams(Params):
    """Arguments of the ``uniform`` layout."""

    num_experts: int = Field(8, ge=1, description="experts per layer")
    top_k: int = Field(2, ge=1, description="experts each token uses (at most num_experts)")
    layers: Union[list[int], Literal["all"]] = Field(
        "all",
        description="decoder layer indices that get experts (negative counts from the end), or 'all'",
    )
    share_across_layers: bool = Field(
        False, description="all chosen layers share one expert bank (each keeps its own router)"
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> "UniformLayoutParams":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("layers must name at least one layer (or be 'all')")
        return self


@hookimpl
def srde_register(registry):
    registry.add(
        "layout",
        "uniform",
        "srde_plugins.layouts.uniform:UniformLayout",
        UniformLayoutParams,
        "The same num_experts and top_k in each chosen layer; optional cross-layer bank sharing.",
    )
