"""The config of a recipe's base model without downloading anything (``srde validate``, ``srde plan``):
the local HF cache, a config shipped with SRDE (``recipes/model_configs/``), or ``[model.config]``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from srde_core.errors import RecipeError


def shipped_config_path(name_or_path: str) -> Path:
    """Where a config shipped with SRDE for a hub id lives: ``recipes/model_configs/ORG--NAME.toml``;
    for a local checkpoint directory, the shipped config of the same name (``*--NAME.toml``)."""
    from importlib.resources import files

    folder = Path(str(files("srde_core") / "recipes" / "model_configs"))
    exact = folder / (name_or_path.replace("/", "--") + ".toml")
    if exact.is_file():
        return exact
    name = Path(name_or_path.rstrip("/")).name
    return next(iter(sorted(folder.glob(f"*--{name}.toml"))), exact) if name else exact


def model_config(recipe: Any, *, tokenizer_vocab: int | None = None) -> Any:
    """The transformers config of ``recipe``'s base model, without downloading anything.

    With ``name_or_path``: the config in the local HF cache (or directory), else one shipped with
    SRDE for that id, else ``[model.config]`` alone; ``[model.config]`` overrides either, as in
    ``from_pretrained``. Without: ``[model.config]`` over the tokenizer's vocabulary size, as a
    run builds it.
    """
    from srde_core.model.build import model_class

    spec = recipe.model
    cls = model_class(spec.architecture)
    where = str(recipe.path)
    if spec.name_or_path:
        from srde_core.model.build import model_location

        config = _cached_config(model_location(recipe))
        if config is None and shipped_config_path(spec.name_or_path).is_file():
            config = _shipped_config(spec.name_or_path)
        if config is None:
            if not spec.config:
                raise RecipeError(
                    f"the config of '{spec.name_or_path}' is not in the local HF cache: add a complete "
                    f"[model.config] table, or cache it (huggingface-cli download {spec.name_or_path} config.json)",
                    source=where, key="model.name_or_path",
                )
            return _config_of(cls, spec.config, where)
        config.update(dict(spec.config))
        return config
    defaults = {"vocab_size": tokenizer_vocab} if tokenizer_vocab is not None and "vocab_size" not in spec.config else {}
    return _config_of(cls, {**defaults, **spec.config}, where)


def _config_of(cls, values: dict[str, Any], where: str) -> Any:
    try:
        return cls.config_class(**values)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"invalid model config: {err}", source=where, key="model.config") from None


def _cached_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return None


def _shipped_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    values = tomllib.loads(shipped_config_path(name_or_path).read_text(encoding="utf-8"))
    values.pop("source", None)
    return AutoConfig.for_model(values.pop("model_type"), **values)
