"""The `uniform` layout: the same experts and top-k in each chosen decoder layer (see :mod:`srde_plugins.layouts`)."""

from __future__ import annotations

from srde_core.errors import RecipeError
from srde_core.model.components import LayerPlan, Layout
from srde_plugins.layouts import UniformLayoutParams
from srde_plugins.layouts.sharing import bank_keys, layer_index


class UniformLayout(Layout):
    """Same ``num_experts`` and ``top_k`` in each chosen layer; a bank per layer unless shared."""

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
                layer = layer_index(index, num_layers, "srde.layout.layers")
                if layer in chosen:
                    raise RecipeError(
                        f"layer {index} names layer {layer}, which is already listed",
                        key="srde.layout.layers",
                    )
                chosen.append(layer)
        layers = sorted(chosen)
        keys = bank_keys(layers, p, num_layers, "srde.layout")
        return [LayerPlan(layer=layer, num_experts=p.num_experts, top_k=p.top_k, bank=keys[layer]) for layer in layers]
