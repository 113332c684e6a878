"""The `uniform` layout: the same experts and top-k in each chosen decoder layer (see :mod:`srde_plugins.layouts`)."""

from __future__ import annotations

from srde_core.errors import RecipeError
from srde_core.model.components import LayerPlan, Layout
from srde_plugins.layouts import UniformLayoutParams


class UniformLayout(Layout):
    """Same ``num_experts`` and ``top_k`` in each chosen layer; a bank per layer unless shared."""

    SHARED_BANK = "shared"

    def __init__(self, params: UniformLayoutParams):
        self.params = params

    def plan(self, num_layers: int) -> list[LayerPlan]:
        """Plans in layer order.

        :raises RecipeError: (key ``srde.layout.layers``) for an index outside the model, or for
            one layer named twice (e.g. ``1`` and ``-3`` of 4 layers).
        """
        p = self.params
        if p.layers == "all":
            chosen = list(range(num_layers))
        else:
            chosen = []
            for index in p.layers:
                if not -num_layers <= index < num_layers:
                    raise RecipeError(
                        f"layer {index} is out of range for a model with {num_layers} layers "
                        f"(valid: {-num_layers}..{num_layers - 1})",
                        key="srde.layout.layers",
                    )
                layer = index % num_layers
                if layer in chosen:
                    raise RecipeError(
                        f"layer {index} names layer {layer}, which is already listed",
                        key="srde.layout.layers",
                    )
                chosen.append(layer)
        return [
            LayerPlan(
                layer=layer,
                num_experts=p.num_experts,
                top_k=p.top_k,
                bank=self.SHARED_BANK if p.share_across_layers else f"layer{layer}",
            )
            for layer in sorted(set(chosen))
        ]
