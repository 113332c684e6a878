"""Validate merged recipe data into a frozen :class:`Recipe`.

Every component name is resolved against the registries and every argument checked here, before
any work starts. The first problem found becomes ONE :class:`RecipeError` line naming the file that
set the key, the key path, and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from srde_core.errors import RecipeError, available, did_you_mean
from srde_core.params import Params, describe_params, slot_of
from srde_core.plugins import PluginSet
from srde_core.recipe.layers import KeyPath, Layers, format_key, read_layers
from srde_core.recipe.schema import PhaseParams, RecipeParams
from srde_core.registry import ComponentChoice


@dataclass(frozen=True)
class Phase:
    """One resolved ``[[phases]]`` entry: its position and its validated keys (``phase.steps``,
    ``phase.trainer``, ``phase.losses``, ...)."""

    index: int
    core: PhaseParams

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)


@dataclass(frozen=True)
class Recipe:
    """A fully resolved recipe. ``resolved`` is its plain-data form (defaults filled in)."""

    path: Path
    top: RecipeParams
    phases: tuple[Phase, ...]
    plugin_settings: Mapping[str, Params]
    required_plugins: tuple[str, ...]
    resolved: dict[str, Any] = field(repr=False)
    base_dir: Path = field(default=None, repr=False)  # type: ignore[assignment]
    path_bases: Mapping[str, str] = field(default_factory=dict, repr=False)

    def base_for(self, key: str) -> Path:
        """The directory a relative path at ``key`` (one of :data:`PATH_KEYS`) resolves against:
        the directory of the recipe file that set it, or the working directory for ``--set`` values
        and the shipped presets' values (see :meth:`Layers.base_for`)."""
        return Path(self.path_bases.get(key, self.base_dir))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.top, name)

    def fingerprint(self) -> str:
        """sha256 of the resolved recipe (stored in adapters and run directories)."""
        canonical = json.dumps(self.resolved, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def settings(self, name: str) -> Params:
        return self.plugin_settings[name]


def _params_class(annotation: Any) -> type[Params] | None:
    """The Params subclass inside an annotation such as ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, Params):
        return annotation
    for arg in typing.get_args(annotation):
        found = _params_class(arg)
        if found is not None:
            return found
    return None


def _fields_at(model: type[Params], loc: tuple) -> list[str]:
    """The valid keys of the table at ``loc`` inside ``model`` (for 'did you mean')."""
    current: type[Params] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        current = _params_class(info.annotation) if info is not None else None
    return list(current.model_fields) if current is not None else []


def _describe_input(value: Any) -> str:
    kind = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )
    shown = repr(value) if not isinstance(value, (list, dict)) else ""
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind} {shown}".strip()


def validate(model: type[Params], data: Any, where: KeyPath, layers: Layers) -> Params:
    """``model.model_validate(data)``, turning the first error into one RecipeError line."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        error = err.errors()[0]
        # union branches show up in `loc` as type names ("list[int]", "function-after[...]")
        loc = tuple(p for p in error["loc"] if isinstance(p, int) or ("[" not in p and "-" not in p))
        path = (*where, *loc)
        if error["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            message = f"unknown key '{loc[-1]}'{did_you_mean(str(loc[-1]), valid)}"
        elif error["type"] == "missing":
            message = "missing required key"
        else:
            text = error["msg"].removeprefix("Value error, ").replace("valid tuple", "valid array").replace(
                "valid list", "valid array")
            message = f"{text[0].lower()}{text[1:]} (got {_describe_input(error.get('input'))})"
        raise RecipeError(message, source=layers.source_of(path), key=format_key(path)) from None


class _Resolver:
    """Resolves raw recipe data against a params class: component fields (at any depth) first,
    each against its kind's registry, then the class itself."""

    def __init__(self, layers: Layers, plugins: PluginSet):
        self.layers = layers
        self.plugins = plugins

    def params(self, cls: type[Params], raw: Any, where: KeyPath) -> Params:
        if not isinstance(raw, dict):
            return validate(cls, raw, where, self.layers)
        args = dict(raw)
        for name, info in cls.model_fields.items():
            slot = slot_of(info)
            if slot is not None:
                value = args.get(name, slot.default)
                if name not in args and slot.required:
                    raise RecipeError("missing required key", source=self.layers.source_of(where), key=format_key((*where, name)))
                if value is None:
                    args.pop(name, None)
                    continue
                args[name] = self.many(slot, value, (*where, name)) if slot.many else self.component(slot.kind, value, (*where, name))
                continue
            nested = _params_class(info.annotation)
            if nested is None:
                continue
            if name in args:
                value = args[name]
                if isinstance(value, list):
                    args[name] = [self.params(nested, v, (*where, name, i)) if isinstance(v, dict) else v for i, v in enumerate(value)]
                elif isinstance(value, dict):
                    args[name] = self.params(nested, value, (*where, name))
            elif not info.is_required() and info.default is None and info.default_factory is nested:
                args[name] = self.params(nested, {}, (*where, name))
        self.misplaced_arguments(cls, args, where)
        return validate(cls, args, where, self.layers)

    def misplaced_arguments(self, cls: type[Params], args: dict[str, Any], where: KeyPath) -> None:
        """An unknown key that is an argument of a component chosen in this same table (a trainer
        argument at the phase level, the selector beside its delta) gets told where it goes."""
        for key in args:
            if key in cls.model_fields:
                continue
            for name, value in args.items():
                if isinstance(value, ComponentChoice) and key in type(value.params).model_fields:
                    table = format_key((*where, name))
                    raise RecipeError(
                        f"unknown key '{key}': it is an argument of {value.kind} '{value.name}'; "
                        f"put it in that table ({table} = {{ name = \"{value.name}\", {key} = ... }})",
                        source=self.layers.source_of((*where, key)),
                        key=format_key((*where, key)),
                    )

    def many(self, slot, value: Any, where: KeyPath) -> tuple[ComponentChoice, ...]:
        if not isinstance(value, list):
            raise RecipeError(
                f"expected an array of {slot.kind} components (got {_describe_input(value)})",
                source=self.layers.source_of(where), key=format_key(where),
            )
        return tuple(self.component(slot.kind, v, (*where, i), weighted=slot.weighted) for i, v in enumerate(value))

    def component(self, kind: str, spec: Any, where: KeyPath, *, weighted: bool = False) -> ComponentChoice:
        """Resolve ``"name"`` or ``{name = "...", arg = ...}`` against the ``kind`` registry."""
        layers, plugins = self.layers, self.plugins
        source = layers.source_of(where)
        key = format_key(where)
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict):
            raise RecipeError(f"expected a {kind} name or a table with 'name'", source=source, key=key)
        args = dict(spec)
        name = args.pop("name", None)
        if not isinstance(name, str):
            raise RecipeError(f"missing the {kind} 'name'", source=source, key=key)
        registry = plugins.registries[kind]
        if name not in registry:
            hint = did_you_mean(name, registry.names())
            raise RecipeError(
                f"unknown {kind} '{name}'{hint}; {available(registry.names())}{plugins.broken_note()}",
                source=layers.source_of((*where, "name")),
                key=format_key((*where, "name")),
            )
        weight = None
        if weighted:
            weight = self.weight(args.pop("weight", 1.0), (*where, "weight"))
        found = registry.get(name)
        params = self.params(found.params, args, where)
        return ComponentChoice(kind, name, params, weight, found)

    def weight(self, value: Any, where: KeyPath) -> float | ComponentChoice:
        """A loss weight: a number >= 0, or a scalar schedule (``{ name = "linear", ... }``)."""
        if isinstance(value, (dict, str)) and not isinstance(value, bool):
            return self.component("schedule", value, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RecipeError(
                f"weight must be a number >= 0 or a schedule table (got {_describe_input(value)})",
                source=self.layers.source_of(where),
                key=format_key(where),
            )
        return float(value)


def _plugin_settings(raw: dict[str, Any], resolver: _Resolver) -> tuple[dict[str, Params], tuple[str, ...]]:
    layers, plugins = resolver.layers, resolver.plugins
    tables = plugins.registries.settings
    require = raw.get("require", [])
    if not isinstance(require, list) or not all(isinstance(r, str) for r in require):
        raise RecipeError("require must be an array of plugin names", source=layers.source_of(("plugins", "require")), key="plugins.require")
    for key, value in raw.items():
        if key == "require":
            continue
        if key not in tables:
            raise RecipeError(
                f"unknown plugin settings table '{key}'{did_you_mean(key, tables)}; {available(tables)}{plugins.broken_note()}",
                source=layers.source_of(("plugins", key)),
                key=f"plugins.{key}",
            )
        if not isinstance(value, dict):
            raise RecipeError("expected a table", source=layers.source_of(("plugins", key)), key=f"plugins.{key}")
    settings = {
        name: resolver.params(table.params, raw.get(name, {}), ("plugins", name)) for name, table in tables.items()
    }
    return settings, tuple(require)


#: The recipe keys that hold file system paths (resolved by :meth:`Recipe.base_for`).
PATH_KEYS = ("model.name_or_path", "tokenizer.file", "tokenizer.name_or_path", "data.train_files",
             "data.eval_files", "data.hf_name", "engine.config")


def _finite_numbers(value: Any, layers: Layers, where: KeyPath = ()) -> None:
    """No NaN or infinity anywhere in a recipe (a learning rate, a loss weight, a schedule's values):
    they pass range checks (``nan > 0`` is false, ``inf > 0`` true) and would only fail at step 1,
    and JSON cannot hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"must be a finite number (got {value})", source=layers.source_of(where), key=format_key(where))
    if isinstance(value, dict):
        for key, item in value.items():
            _finite_numbers(item, layers, (*where, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite_numbers(item, layers, (*where, i))


def _check_phases(phases: tuple[Phase, ...], settings: Mapping[str, Params], layers: Layers) -> None:
    """Names unique across phases; each phase's losses distinct (a loss twice would count twice and
    log once); the ``phases`` lists of plugin settings name phases of this recipe."""
    names = [p.name for p in phases]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RecipeError(f"duplicate phase name '{name}'", source=layers.source_of(("phases", i, "name")), key=format_key(("phases", i, "name")))
    for phase in phases:
        seen: list[str] = []
        for j, loss in enumerate(phase.losses):
            if loss.name in seen:
                where = ("phases", phase.index, "losses", j)
                raise RecipeError(f"loss '{loss.name}' appears twice in the phase (give it one weight instead)",
                                  source=layers.source_of(where), key=format_key(where))
            seen.append(loss.name)
    for table, params in settings.items():
        listed = getattr(params, "phases", None)
        if not isinstance(listed, (list, tuple)):
            continue
        for i, name in enumerate(listed):
            if isinstance(name, str) and name not in names:
                where = ("plugins", table, "phases", i)
                raise RecipeError(f"no phase named '{name}'{did_you_mean(name, names)}; this recipe's phases: "
                                  f"{', '.join(names)}", source=layers.source_of(where), key=format_key(where))


def _check_registered(kind: str, value: str | None, where: tuple[str, ...], what: str, layers: Layers,
                      plugins: PluginSet) -> None:
    """``value`` (at ``where``) names a registered component of ``kind``; None: nothing to check."""
    names = plugins.registries[kind].names()
    if value is not None and value not in names:
        raise RecipeError(f"unknown {what} '{value}'{did_you_mean(value, names)}; {available(names)}"
                          f"{plugins.broken_note()}", source=layers.source_of(where), key=format_key(where))


def _check_corpus(top: RecipeParams, layers: Layers, plugins: PluginSet) -> None:
    """``[data.generate] corpus`` names a registered corpus."""
    generate = top.data.generate
    _check_registered("corpus", generate and generate.corpus, ("data", "generate", "corpus"), "corpus", layers, plugins)


def _check_format(top: RecipeParams, layers: Layers, plugins: PluginSet) -> None:
    """``data.format`` names a registered data format (a ``source`` component)."""
    _check_registered("source", top.data.format, ("data", "format"), "data format", layers, plugins)


def _check_tokenizer(top: RecipeParams, layers: Layers, plugins: PluginSet) -> None:
    """``tokenizer.kind`` names a registered tokenizer kind (a ``tokenizer`` component)."""
    _check_registered("tokenizer", top.tokenizer.kind, ("tokenizer", "kind"), "tokenizer kind", layers, plugins)


def resolve(layers: Layers, plugins: PluginSet, path_bases: Mapping[str, str] | None = None) -> Recipe:
    """Validate merged recipe data against the schema and the registries."""
    resolver = _Resolver(layers, plugins)
    _finite_numbers(layers.data, layers)
    raw = dict(layers.data)
    raw_plugins = raw.pop("plugins", {})
    if not isinstance(raw_plugins, dict):
        raise RecipeError("expected a table", source=layers.source_of(("plugins",)), key="plugins")
    top = resolver.params(RecipeParams, raw, ())
    _check_corpus(top, layers, plugins)
    _check_format(top, layers, plugins)
    _check_tokenizer(top, layers, plugins)
    phases = tuple(Phase(i, core) for i, core in enumerate(top.phases))
    settings, required = _plugin_settings(raw_plugins, resolver)
    _check_phases(phases, settings, layers)
    from srde_core.plugins import require_healthy

    require_healthy(plugins, list(required), source=layers.source_of(("plugins", "require")))
    resolved = describe_params(top)
    resolved["plugins"] = {"require": list(required), **{k: describe_params(v) for k, v in settings.items()}}
    return Recipe(
        path=layers.top,
        top=top,
        phases=phases,
        plugin_settings=types.MappingProxyType(settings),
        required_plugins=required,
        resolved=resolved,
        base_dir=layers.base_dir,
        path_bases=types.MappingProxyType(dict(path_bases) if path_bases is not None else {
            key: str(layers.base_for(tuple(key.split(".")))) for key in PATH_KEYS}),
    )


def resolve_component(plugins: PluginSet, kind: str, spec: Any, *, source: str = "<python>") -> ComponentChoice:
    """Resolve one component spec (``"name"`` or ``{"name": ..., **args}``) as a recipe would."""
    layers = Layers(Path(source))
    return _Resolver(layers, plugins).component(kind, spec, ())


def load_recipe(path: str | Path, plugins: PluginSet, overrides: list[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file or a shipped preset (``srde:max``)."""
    return resolve(read_layers(path, list(overrides)), plugins)


def recipe_from_resolved(data: dict[str, Any], path: str | Path, plugins: PluginSet, base_dir: str | Path | None = None,
                         path_bases: Mapping[str, str] | None = None) -> Recipe:
    """Rebuild a :class:`Recipe` from its ``resolved`` form (as saved in a run directory).

    ``base_dir`` is the directory relative data paths were resolved against when the run started,
    ``path_bases`` the directory of each path key (runs that predate it: ``base_dir`` for all).
    """
    layers = Layers(Path(path), Path(base_dir) if base_dir is not None else None)
    layers.merge(data, f"{path} (saved run recipe)")
    return resolve(layers, plugins, path_bases)
