"""Bank keys for the layouts' cross-layer sharing options (see :mod:`srde_plugins.layouts`)."""

from __future__ import annotations

from srde_core.errors import RecipeError


def layer_index(index: int, num_layers: int, key: str) -> int:
    """``index`` (negative counts from the end) as a layer of a ``num_layers``-layer model."""
    if not -num_layers <= index < num_layers:
        raise RecipeError(
            f"layer {index} is out of range for a model with {num_layers} layers "
            f"(valid: {-num_layers}..{num_layers - 1})",
            key=key,
        )
    return index % num_layers


def bank_keys(layers: list[int], params, num_layers: int, key_prefix: str) -> dict[int, str]:
    """Layer -> bank key for the chosen ``layers`` (in order) under the sharing options ``params``."""
    if params.share_across_layers:
        return {layer: "shared" for layer in layers}
    if params.share_every > 1:
        return {layer: f"group{i // params.share_every}" for i, layer in enumerate(layers)}
    keys = {layer: f"layer{layer}" for layer in layers}
    seen: dict[int, int] = {}
    for g, group in enumerate(params.share_groups):
        for index in group:
            layer = layer_index(index, num_layers, f"{key_prefix}.share_groups")
            if layer not in keys:
                raise RecipeError(f"share_groups names layer {index}, which gets no experts", key=f"{key_prefix}.share_groups")
            if layer in seen:
                raise RecipeError(f"share_groups names layer {index} twice", key=f"{key_prefix}.share_groups")
            seen[layer] = g
            keys[layer] = f"group{g}"
    return keys
