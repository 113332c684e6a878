"""The plugin manager: built-in and third-party plugins load the same way.

Every plugin is an entry point in the group ``srde`` (our own are declared in pyproject.toml).
The project's own distribution registers first, then the others by entry-point name. A plugin that
fails to import, implements an unknown hook, breaks while registering, or registers a name another
plugin already provides (a clash: built-ins are never displaced) is recorded as broken with its
error, in one line, and registers nothing; the others still load. A plugin replaces a built-in
component only by saying so (``registry.add(..., override=True)``), and the run header says so.
"""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from srde_core import hookspecs
from srde_core.errors import PluginError
from srde_core.registry import Component, KindRegistrar, Registries, SettingsTable

ENTRY_POINT_GROUP = "srde"
#: The project's own distribution: its plugins are the built-ins, registered first.
PROJECT_DISTRIBUTION = "srde"
#: The name under which the core's own hook implementations are registered.
CORE_PLUGIN = "srde-core"


@dataclass(frozen=True)
class PluginInfo:
    """One discovered plugin: its entry-point name, distribution and what it provides."""

    name: str
    distribution: str
    version: str
    summary: str
    error: str | None = None


@dataclass
class PluginSet:
    """The loaded plugins: the pluggy manager, the filled registries and what failed."""

    manager: pluggy.PluginManager
    registries: Registries
    plugins: list[PluginInfo] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        return self.manager.hook

    @property
    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def broken_note(self) -> str:
        """A hint appended to 'unknown component' errors when some plugin failed to load."""
        if not self.broken:
            return ""
        return "; " + "; ".join(f"plugin '{p.name}' failed to load ({p.error})" for p in self.broken)


def _first_doc_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


class _StagedRegistrar:
    """Collects one plugin's registrations so a plugin that fails halfway registers nothing."""

    def __init__(self, provider: str, registries: Registries):
        self.provider = provider
        self._staging = Registries()
        for registry in registries.kinds.values():
            self._staging.declare(registry.spec)
        self._target = self._staging.for_provider(provider)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def commit(self, registries: Registries, builtins: set[str]) -> None:
        staged = list(self._staging.components())
        settings: list[SettingsTable] = list(self._staging.settings.values())
        replacing: list[Component] = []
        for component in staged:  # check every name before adding any
            existing = registries[component.kind]
            if component.name in existing:
                taken = existing.get(component.name)
                if component.override and taken.provider in builtins and taken.replaces is None:
                    replacing.append(replace(component, replaces=taken.provider))
                    continue
                hint = "; register it with override=True to replace the built-in" if taken.provider in builtins else ""
                raise PluginError(
                    f"{component.kind} '{component.name}' is provided twice: by '{taken.provider}' and by "
                    f"'{component.provider}'{hint}"
                )
        for table in settings:
            if table.name in registries.settings:
                registries.add_settings(table)
        for component in staged:
            if not any(r.kind == component.kind and r.name == component.name for r in replacing):
                registries[component.kind].add(component)
        for component in replacing:
            registries[component.kind].replace(component)
        for table in settings:
            registries.add_settings(table)


def _call_each(
    manager: pluggy.PluginManager, hook: str, call, infos: dict[str, PluginInfo], order: list[str]
) -> None:
    """Call ``call(impl)`` for every implementation of ``hook``, in ``order`` (the core, the
    project's own plugins, then the others); a plugin that raises is broken."""
    rank = {name: i for i, name in enumerate(order)}
    impls = sorted(getattr(manager.hook, hook).get_hookimpls(), key=lambda impl: rank.get(impl.plugin_name, len(rank)))
    for impl in impls:
        name = impl.plugin_name
        try:
            call(impl)
        except BaseException as err:  # SystemExit too: a plugin must not end the command
            if isinstance(err, KeyboardInterrupt):
                raise
            if name == CORE_PLUGIN:
                raise
            manager.unregister(name=name)
            old = infos.get(name)
            infos[name] = PluginInfo(
                name, old.distribution if old else "?", old.version if old else "?",
                old.summary if old else "", _error_text(err),
            )


def load_plugins(
    *, entry_points: list[metadata.EntryPoint] | None = None, extra: Sequence[tuple[str, Any]] = ()
) -> PluginSet:
    """Discover, import and register every plugin of the ``srde`` entry-point group.

    ``extra``: ``(name, plugin)`` pairs registered after the entry points (tests, embedding
    applications); they go through the same checks.
    """
    from srde_core import defaults

    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    manager.register(defaults, name=CORE_PLUGIN)
    registries = Registries()
    plugin_set = PluginSet(manager, registries)
    infos: dict[str, PluginInfo] = {}

    eps = entry_points if entry_points is not None else metadata.entry_points(group=ENTRY_POINT_GROUP)
    candidates: list[tuple[str, str, str, Any]] = []
    for ep in eps:
        dist = getattr(ep, "dist", None)
        candidates.append((ep.name, dist.metadata["Name"] if dist is not None else "?", dist.version if dist is not None else "?", ep))
    candidates.sort(key=lambda c: (c[1] != PROJECT_DISTRIBUTION, c[0]))  # built-ins first
    candidates += [(name, "(in process)", "", plugin) for name, plugin in extra]
    builtins = {CORE_PLUGIN} | {name for name, dist_name, _, _ in candidates if dist_name == PROJECT_DISTRIBUTION}
    order = [CORE_PLUGIN] + [name for name, *_ in candidates]
    for name, dist_name, version, source in candidates:
        if name in infos or manager.has_plugin(name):
            infos[f"{name}@{dist_name}"] = PluginInfo(
                name, dist_name, version, "", f"entry point name '{name}' is used twice"
            )
            continue
        try:
            plugin = source.load() if isinstance(source, metadata.EntryPoint) else source
            manager.register(plugin, name=name)
        except BaseException as err:  # a broken plugin (even one calling sys.exit) must not take the others down
            if isinstance(err, KeyboardInterrupt):
                raise
            infos[name] = PluginInfo(name, dist_name, version, "", _error_text(err))
            continue
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as err:
            manager.unregister(name=name)
            infos[name] = PluginInfo(name, dist_name, version, "", _error_text(err))
            continue
        infos[name] = PluginInfo(name, dist_name, version, _first_doc_line(plugin))

    def add_kinds(impl) -> None:
        impl.function(kinds=KindRegistrar(registries, impl.plugin_name))

    def register(impl) -> None:
        registrar = _StagedRegistrar(impl.plugin_name, registries)
        impl.function(registry=registrar)
        registrar.commit(registries, builtins)

    _call_each(manager, "srde_add_kinds", add_kinds, infos, order)
    _call_each(manager, "srde_register", register, infos, order)
    registries.freeze()
    plugin_set.plugins = sorted(infos.values(), key=lambda p: p.name)
    return plugin_set


def override_lines(recipe: Any) -> list[str]:
    """One line per component the recipe uses that a plugin put in place of a built-in."""
    from srde_core.registry import iter_choices

    seen: dict[tuple[str, str], str] = {}
    for choice in iter_choices([recipe.top, [phase.core for phase in recipe.phases], dict(recipe.plugin_settings)]):
        component = choice.component
        if component is not None and component.replaces is not None:
            seen[(component.kind, component.name)] = (
                f"override: {component.kind} '{component.name}' is plugin '{component.provider}''s, "
                f"in place of the built-in from '{component.replaces}'"
            )
    return list(seen.values())


def provided_by(plugin_set: PluginSet, plugin_name: str) -> list[tuple[str, str]]:
    """(kind, name) pairs of the kinds (``("kind", name)``), components and settings tables a
    plugin declared or registered."""
    items = [("kind", r.kind) for r in plugin_set.registries.kinds.values() if r.spec.provider == plugin_name]
    items += [(c.kind, c.name) for c in plugin_set.registries.components() if c.provider == plugin_name]
    items += [
        ("settings", f"plugins.{t.name}")
        for t in plugin_set.registries.settings.values()
        if t.provider == plugin_name
    ]
    return items


def require_healthy(plugin_set: PluginSet, names: list[str], source: str | None = None) -> None:
    """Stop with a clear message when the recipe requires a plugin that is broken or absent."""
    by_name = {p.name: p for p in plugin_set.plugins}
    for name in names:
        info = by_name.get(name)
        if info is None:
            raise PluginError(f"required plugin '{name}' is not installed", source=source, key="plugins.require")
        if info.error:
            raise PluginError(
                f"required plugin '{name}' failed to load: {info.error}", source=source, key="plugins.require"
            )
