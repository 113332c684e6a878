"""What a recipe decides before any work, beyond its schema (``srde validate``, and ``srde run``
before anything is loaded or created).

- The plugins' own checks of the recipe (``srde_run_header``: conflicts between components, such as
  a selector that moves entries with adaptive sparsity, or an engine that cannot follow it).
- Each component's factory builds (import typos, contract violations), seeded apart from the run.
- The base model is built from its config on the meta device (no weights, no memory) and the
  recipe's experts are attached to it: architecture and attention names, the config's sizes,
  layer indices, share groups, block shapes, a layout without experts. The config comes from
  ``[model.config]``, the local HF cache or a config shipped with srde; without one, this part
  cannot be decided here and is left to the run.

Every problem is one :class:`RecipeError` line (exit status 2) naming the recipe and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from srde_core.errors import RecipeError, SRDEError, one_line


def check_recipe(recipe: Any, plugins: Any) -> None:
    """Decide everything decidable from ``recipe`` and its model config; raise one RecipeError."""
    source = str(recipe.path)
    with _as_recipe_error(source, "plugins"):
        for _ in plugins.hook.srde_run_header(recipe=recipe):
            pass
    with _as_recipe_error(source, "phases", others=False):  # a factory that raises is its plugin's failure
        from srde_core.run import build_components

        build_components(recipe)
    with _as_recipe_error(source, "engine", others=False):
        recipe.engine.build().check_recipe(recipe)
    _check_model(recipe, plugins, source)


class _as_recipe_error:
    """An SRDEError raised inside becomes a RecipeError (exit 2) with its own key, or ``key``; any
    other exception becomes one line at ``key`` (with ``others``; else it passes on, to be named as
    the failure of the plugin that raised it)."""

    def __init__(self, source: str, key: str, what: str = "", *, others: bool = True):
        self.source, self.key, self.what, self.others = source, key, what, others

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, Exception) or (isinstance(err, RecipeError) and err.source):
            return False
        if isinstance(err, SRDEError):
            raise RecipeError(err.message, source=err.source or self.source, key=err.key or self.key) from None
        if not self.others:
            return False
        raise RecipeError(f"{self.what}{one_line(err)}", source=self.source, key=self.key) from None


def _check_model(recipe: Any, plugins: Any, source: str) -> None:
    import torch

    from srde_core.model.build import model_class
    from srde_core.model.config import model_config

    spec = recipe.model
    with _as_recipe_error(source, "model.architecture"):
        from srde_core.model.architectures import supported_architectures

        cls = model_class(spec.architecture)
        if not spec.architecture.endswith("ForCausalLM") and spec.architecture not in supported_architectures():
            raise RecipeError(f"'{spec.architecture}' is not a causal language model (a ...ForCausalLM class, or "
                              f"one of {', '.join(supported_architectures())})", source=source, key="model.architecture")
    try:
        config = model_config(recipe)
    except RecipeError as err:
        if err.key == "model.name_or_path":  # no config here without downloading: the run decides
            return
        raise
    with _as_recipe_error(source, "model.config", "the model config does not build: "):
        sizes = {k: v for k, v in config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)}
        negative = sorted(k for k, v in sizes.items() if v < 0 and k.endswith(("_size", "_layers", "_heads", "_dim")))
        if negative:
            raise RecipeError(f"{negative[0]} must not be negative (got {sizes[negative[0]]})", source=source,
                              key="model.config")
    _check_vocabulary(recipe, source, plugins)
    attention = spec.attn_implementation
    for extra in plugins.hook.srde_model_load_kwargs(recipe=recipe):
        attention = (extra or {}).get("attn_implementation", attention)
    with _as_recipe_error(source, "model.attn_implementation" if attention == spec.attn_implementation else "plugins",
                          "the model does not build: "):
        with torch.device("meta"):
            model = cls._from_config(config, dtype=getattr(torch, spec.dtype), attn_implementation=attention)
    with _as_recipe_error(source, "srde", "the experts do not attach to the model: "):
        from srde_core.model.build import attach_recipe_experts

        experts = attach_recipe_experts(model, recipe)
        if not experts.layers:
            raise RecipeError(f"layout '{recipe.srde.layout.name}' puts no expert on any of the model's "
                              f"{config.num_hidden_layers} layers", source=source, key="srde.layout")


def _check_vocabulary(recipe: Any, source: str, plugins: Any = None) -> None:
    """A ``model.config.vocab_size`` below the tokenizer's vocabulary: ids past the embedding would
    fail in the first forward. Decided where the tokenizer is on this machine (a file, a shipped
    one, a local directory); a hub tokenizer is left to the run."""
    vocab = recipe.model.config.get("vocab_size")
    params = recipe.tokenizer
    if not isinstance(vocab, int) or isinstance(vocab, bool) or params.from_model:
        return
    if params.kind == "hf":
        name = Path(params.name_or_path or "").expanduser()
        if not (name.is_absolute() and name.is_dir()) and not (recipe.base_for("tokenizer.name_or_path") / name).is_dir():
            return
    from srde_core.data.loading import recipe_tokenizer

    try:
        tokenizer = recipe_tokenizer(recipe, plugins)
    except SRDEError:  # a tokenizer that does not load is the run's to name
        return
    check_vocab_size(vocab, tokenizer.vocab_size, source)


def check_vocab_size(vocab: int, tokenizer_vocab: int, source: str) -> None:
    if vocab < tokenizer_vocab:
        raise RecipeError(f"{vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab} ids): ids from "
                          f"{vocab} on have no embedding; leave it out (the tokenizer's size is used) or set it to at "
                          f"least {tokenizer_vocab}", source=source, key="model.config.vocab_size")
