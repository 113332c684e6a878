"""Validate merged recipe data into a frozen :class:`Recipe`.

Every component name is resolved against the registries and every argument checked here, before
any work starts. The first problem found becomes ONE :class:`RecipeError` line naming the file that
set the key, the key path, and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from srde_core.errors import RecipeError, available, did_you_mean
from srde_core.params import Params
from srde_core.plugins import PluginSet
from srde_core.recipe.layers import KeyPath, Layers, format_key, read_layers
from srde_core.recipe.schema import EvalParams, ModelParams, PhaseParams, RecipeParams, SRDEParams


@dataclass(frozen=True)
class ComponentChoice:
    """A component picked by the recipe: registry kind, name and validated params."""

    kind: str
    name: str
    params: Params
    weight: float = 1.0  # used by losses only

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params.model_dump(mode="json")}


@dataclass(frozen=True)
class Phase:
    """One resolved ``[[phases]]`` entry."""

    index: int
    core: PhaseParams
    trainer: ComponentChoice
    scheduler: ComponentChoice
    losses: tuple[ComponentChoice, ...]

    def __getattr__(self, name: str) -> Any:
        # phase.steps, phase.lr, ... read through to the validated core fields
        return getattr(self.core, name)


@dataclass(frozen=True)
class SRDEChoice:
    projections: tuple[str, ...]
    layout: ComponentChoice
    delta: ComponentChoice
    selector: ComponentChoice


@dataclass(frozen=True)
class Recipe:
    """A fully resolved recipe. ``resolved`` is its plain-data form (defaults filled in)."""

    path: Path
    top: RecipeParams
    model: ModelParams
    srde: SRDEChoice
    phases: tuple[Phase, ...]
    eval: EvalParams
    plugin_settings: Mapping[str, Params]
    required_plugins: tuple[str, ...]
    resolved: dict[str, Any] = field(repr=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.top, name)

    @property
    def base_dir(self) -> Path:
        """Relative data paths in a recipe are relative to the recipe file's directory."""
        return self.path.resolve().parent

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
            message = f"{error['msg'][0].lower()}{error['msg'][1:]} (got {_describe_input(error.get('input'))})"
        raise RecipeError(message, source=layers.source_of(path), key=format_key(path)) from None


def _component(
    kind: str, spec: Any, where: KeyPath, layers: Layers, plugins: PluginSet, *, with_weight: bool = False
) -> ComponentChoice:
    """Resolve ``"name"`` or ``{name = "...", arg = ...}`` against the ``kind`` registry."""
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
    weight = 1.0
    if with_weight and "weight" in args:
        weight = args.pop("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise RecipeError(
                f"weight must be a number >= 0 (got {_describe_input(weight)})",
                source=layers.source_of((*where, "weight")),
                key=format_key((*where, "weight")),
            )
    params = validate(registry.get(name).params, args, where, layers)
    return ComponentChoice(kind, name, params, float(weight))


def _phase(index: int, raw: Any, layers: Layers, plugins: PluginSet) -> Phase:
    where: KeyPath = ("phases", index)
    if not isinstance(raw, dict):
        raise RecipeError("each [[phases]] entry must be a table", source=layers.source_of(where), key=format_key(where))
    core_keys = set(PhaseParams.model_fields)
    core_raw = {k: v for k, v in raw.items() if k in core_keys}
    extra = {k: v for k, v in raw.items() if k not in core_keys}
    trainer_name = raw.get("trainer")
    trainer_params_cls = None
    if isinstance(trainer_name, str) and trainer_name in plugins.registries["trainer"]:
        trainer_params_cls = plugins.registries["trainer"].get(trainer_name).params
    for key in extra:  # unknown to both the phase and its trainer
        if trainer_params_cls is None or key not in trainer_params_cls.model_fields:
            valid = [*core_keys, *(trainer_params_cls.model_fields if trainer_params_cls else [])]
            owner = f" for trainer '{trainer_name}'" if trainer_params_cls else ""
            raise RecipeError(
                f"unknown key '{key}'{owner}{did_you_mean(key, valid)}",
                source=layers.source_of((*where, key)),
                key=format_key((*where, key)),
            )
    core = validate(PhaseParams, core_raw, where, layers)
    trainer = _component("trainer", {"name": core.trainer, **extra}, where, layers, plugins)
    scheduler = _component("scheduler", core.scheduler, (*where, "scheduler"), layers, plugins)
    losses = tuple(
        _component("loss", spec, (*where, "losses", i), layers, plugins, with_weight=True)
        for i, spec in enumerate(core.losses)
    )
    return Phase(index, core, trainer, scheduler, losses)


def _plugin_settings(raw: dict[str, Any], layers: Layers, plugins: PluginSet) -> tuple[dict[str, Params], tuple[str, ...]]:
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
        name: validate(table.params, raw.get(name, {}), ("plugins", name), layers) for name, table in tables.items()
    }
    return settings, tuple(require)


def resolve(layers: Layers, plugins: PluginSet) -> Recipe:
    """Validate merged recipe data against the schema and the registries."""
    top = validate(RecipeParams, layers.data, (), layers)
    srde_raw: SRDEParams = top.srde
    srde = SRDEChoice(
        projections=tuple(dict.fromkeys(srde_raw.projections)),
        layout=_component("layout", srde_raw.layout, ("srde", "layout"), layers, plugins),
        delta=_component("delta", srde_raw.delta, ("srde", "delta"), layers, plugins),
        selector=_component("selector", srde_raw.selector, ("srde", "selector"), layers, plugins),
    )
    phases = tuple(_phase(i, raw, layers, plugins) for i, raw in enumerate(top.phases))
    names = [p.core.name for p in phases]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RecipeError(f"duplicate phase name '{name}'", source=layers.source_of(("phases", i, "name")), key=format_key(("phases", i, "name")))
    settings, required = _plugin_settings(top.plugins, layers, plugins)
    from srde_core.plugins import require_healthy

    require_healthy(plugins, list(required), source=layers.source_of(("plugins", "require")))
    resolved = top.model_dump(mode="json")
    resolved["srde"] = {
        "projections": list(srde.projections),
        "layout": srde.layout.describe(),
        "delta": srde.delta.describe(),
        "selector": srde.selector.describe(),
    }
    resolved["phases"] = [_describe_phase(p) for p in phases]
    resolved["plugins"] = {"require": list(required), **{k: v.model_dump(mode="json") for k, v in settings.items()}}
    return Recipe(
        path=layers.top,
        top=top,
        model=top.model,
        srde=srde,
        phases=phases,
        eval=top.eval,
        plugin_settings=types.MappingProxyType(settings),
        required_plugins=required,
        resolved=resolved,
    )


def _describe_phase(phase: Phase) -> dict[str, Any]:
    data = phase.core.model_dump(mode="json")
    data.update(phase.trainer.params.model_dump(mode="json"))
    data["scheduler"] = phase.scheduler.describe()
    data["losses"] = [{**loss.describe(), "weight": loss.weight} for loss in phase.losses]
    return data


def load_recipe(path: str | Path, plugins: PluginSet, overrides: list[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file."""
    return resolve(read_layers(Path(path), list(overrides)), plugins)


def recipe_from_resolved(data: dict[str, Any], path: str | Path, plugins: PluginSet) -> Recipe:
    """Rebuild a :class:`Recipe` from its ``resolved`` form (as saved in a run directory)."""
    layers = Layers(Path(path))
    layers.merge(data, f"{path} (saved run recipe)")
    return resolve(layers, plugins)
