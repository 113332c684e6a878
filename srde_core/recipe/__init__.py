"""TOML recipes: ``extends`` chains, ``--set`` overrides, validation into a frozen resolved recipe."""

from srde_core.recipe.resolve import Recipe, load_recipe, resolve_component

__all__ = ["Recipe", "load_recipe", "resolve_component"]
