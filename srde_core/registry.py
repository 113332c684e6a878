"""One registry per component kind, filled by plugins through the ``srde_register`` hook.

A component is picked by name from a recipe. Each entry has a factory, a typed argument schema
(a :class:`~srde_core.params.Params` subclass validated before any work starts) and a one-line
summary that ``srde list-plugins`` shows. Two providers of one name in one kind is an error that
names both. After start-up the registries are frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from srde_core.errors import PluginError, RecipeError, available, did_you_mean
from srde_core.params import NoParams, Params

#: The component kinds. A kind is a core concept (the run loop knows where each is used);
#: the components of a kind are open to any plugin.
KINDS: tuple[str, ...] = ("selector", "delta", "layout", "loss", "scheduler", "trainer")


@dataclass(frozen=True)
class Component:
    """A registered component: ``factory(params, **context)`` builds it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[Params]
    summary: str
    provider: str

    def build(self, params: Params, **context: Any) -> Any:
        return self.factory(params, **context)


@dataclass(frozen=True)
class SettingsTable:
    """A ``[plugins.NAME]`` recipe table declared by a hook plugin (e.g. torch.compile options)."""

    name: str
    params: type[Params]
    summary: str
    provider: str


def _insert_unique(entries: dict, name: str, entry: Any, *, frozen: bool, label: str) -> None:
    """Add ``entry`` under ``name``; a second provider of the same name is an error naming both."""
    if frozen:
        raise PluginError(f"the {label} registry is frozen; register from srde_register")
    existing = entries.get(name)
    if existing is not None:
        raise PluginError(
            f"{label} '{name}' is provided twice: by '{existing.provider}' and by '{entry.provider}'"
        )
    entries[name] = entry


def _summary(summary: str | None, factory: Callable[..., Any]) -> str:
    text = summary or (factory.__doc__ or "").strip()
    return text.splitlines()[0].strip() if text else ""


class Registry:
    """The components of one kind."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Component] = {}
        self._frozen = False

    def add(self, component: Component) -> None:
        _insert_unique(self._entries, component.name, component, frozen=self._frozen, label=self.kind)

    def get(self, name: str, *, source: str | None = None, key: str | None = None) -> Component:
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries)
            raise RecipeError(
                f"unknown {self.kind} '{name}'{hint}; {available(self._entries)}",
                source=source,
                key=key,
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._entries.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def freeze(self) -> None:
        self._frozen = True


class Registries:
    """All registries plus the plugin settings tables. Passed to ``srde_register`` hooks."""

    def __init__(self) -> None:
        self.kinds: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
        self.settings: dict[str, SettingsTable] = {}
        self._frozen = False

    def __getitem__(self, kind: str) -> Registry:
        try:
            return self.kinds[kind]
        except KeyError:
            raise PluginError(
                f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)}; {available(KINDS)}"
            ) from None

    def for_provider(self, provider: str) -> ProviderRegistrar:
        return ProviderRegistrar(self, provider)

    def add_settings(self, table: SettingsTable) -> None:
        _insert_unique(self.settings, table.name, table, frozen=self._frozen, label="settings table")

    def components(self) -> Iterator[Component]:
        for registry in self.kinds.values():
            yield from registry

    def freeze(self) -> None:
        self._frozen = True
        for registry in self.kinds.values():
            registry.freeze()


class ProviderRegistrar:
    """What a plugin's ``srde_register(registry)`` receives: registers under the plugin's name.

    ``registry.add("scheduler", "cosine", make_cosine, CosineParams, "Cosine decay.")`` or, as a
    decorator, ``@registry.component("scheduler", "cosine", CosineParams)`` on the factory (the
    first docstring line becomes the summary).
    """

    def __init__(self, registries: Registries, provider: str):
        self._registries = registries
        self.provider = provider

    def add(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        params: type[Params] = NoParams,
        summary: str | None = None,
    ) -> None:
        if not (isinstance(params, type) and issubclass(params, Params)):
            raise PluginError(
                f"plugin '{self.provider}': {kind} '{name}' params must subclass srde_core.params.Params"
            )
        if not callable(factory):
            raise PluginError(f"plugin '{self.provider}': {kind} '{name}' factory is not callable")
        component = Component(kind, name, factory, params, _summary(summary, factory), self.provider)
        self._registries[kind].add(component)

    def component(
        self, kind: str, name: str, params: type[Params] = NoParams, summary: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.add(kind, name, factory, params, summary)
            return factory

        return decorate

    def settings(self, name: str, params: type[Params], summary: str) -> None:
        """Declare the ``[plugins.NAME]`` table this plugin reads its options from."""
        if not (isinstance(params, type) and issubclass(params, Params)):
            raise PluginError(
                f"plugin '{self.provider}': settings '{name}' must subclass srde_core.params.Params"
            )
        self._registries.add_settings(SettingsTable(name, params, summary, self.provider))
