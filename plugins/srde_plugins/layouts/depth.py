"""The `depth` layout: experts and top-k by relative depth (see :mod:`srde_plugins.layouts`)."""

from __future__ import annotations

from srde_core.model.components import LayerPlan, Layout
from srde_plugins.layouts import DepthLayoutParams
from srde_plugins.layouts.sharing import bank_keys


class DepthLayout(Layout):
    """Layer ``i`` of ``L`` falls in the first stage with ``(i + 0.5) / L < until``: on 40 layers the
    default gives layers 0-9, 10-29 and 30-39 4, 8 and 4 experts; on 4 layers, 0 | 1-2 | 3."""

    def __init__(self, params: DepthLayoutParams):
        self.params = params

    def stage_of(self, layer: int, num_layers: int):
        depth = (layer + 0.5) / num_layers
        return next(stage for stage in self.params.stages if depth < stage.until or stage.until == 1.0)

    def plan(self, num_layers: int) -> list[LayerPlan]:
        stages = {layer: self.stage_of(layer, num_layers) for layer in range(num_layers)}
        layers = [layer for layer, stage in stages.items() if stage.num_experts > 0]
        keys = bank_keys(layers, self.params, num_layers, "srde.layout")
        return [
            LayerPlan(layer=layer, num_experts=stages[layer].num_experts, top_k=stages[layer].top_k, bank=keys[layer])
            for layer in layers
        ]
