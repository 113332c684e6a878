"""Component kinds and their registries, filled by plugins through two hooks.

A *kind* (``selector``, ``delta``, ``engine``, ``reward``, ...) is declared once, with the contract
its components satisfy, from ``srde_add_kinds``; the core declares its own kinds the same way
(:mod:`srde_core.kinds`). A *component* is registered under a kind and a name from
``srde_register``: a factory (a callable, or a lazy ``"module:attr"`` string so registration
modules stay free of torch), a typed argument schema (:class:`~srde_core.params.Params`) and a
one-line summary. Two providers of one name, or of one kind, is an error that names both. After
start-up everything is frozen.

Components hand their results back through their contract, never by writing into the run or into
each other: a trainer returns its metrics, and the base it trained as a
:class:`~srde_core.train.trainer.PhaseResult` (the run sets ``run.base``); a delta bank says what it
holds through :class:`~srde_core.model.components.DeltaBank` (``density()``, ``activation_bytes``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from srde_core.errors import PluginError, RecipeError, available, did_you_mean
from srde_core.params import NoParams, Params, describe_params

#: ``contract`` value of kinds whose components are plain callables (losses, LR schedules).
CALLABLE = "callable"


def resolve_object(target: Any) -> Any:
    """``"package.module:attr"`` imported on first use; anything else returned as is."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise PluginError(f"lazy reference {target!r} must look like 'package.module:attr'")
    value: Any = importlib.import_module(module)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class Kind:
    """A component kind: its name, what its components must be, and who declared it.

    ``contract`` is a class (or lazy ``"module:attr"`` reference to one) that every built
    component must be an instance of, :data:`CALLABLE` for plain callables, or None.
    """

    name: str
    summary: str
    contract: Any
    provider: str

    def check(self, component: Component, built: Any) -> Any:
        contract = self.contract if self.contract == CALLABLE else resolve_object(self.contract)
        if contract is None:
            return built
        ok = callable(built) if contract == CALLABLE else isinstance(built, contract)
        if not ok:
            expected = "a callable" if contract == CALLABLE else f"a {contract.__module__}.{contract.__qualname__}"
            raise PluginError(
                f"{self.name} '{component.name}' (plugin '{component.provider}') built "
                f"{type(built).__name__}, not {expected}"
            )
        return built


@dataclass(frozen=True)
class Component:
    """A registered component: ``factory(params, **context)`` builds it."""

    kind: str
    name: str
    factory: Any  # a callable or a lazy "module:attr" reference
    params: type[Params]
    summary: str
    provider: str
    contract: Kind | None = field(default=None, compare=False, repr=False)
    #: Registered with ``override=True``: may replace a built-in of the same name.
    override: bool = field(default=False, compare=False)
    #: The provider of the built-in this component replaced (set when it did), for the run header.
    replaces: str | None = field(default=None, compare=False)

    def build(self, params: Params, **context: Any) -> Any:
        from srde_core.params import slot_fields

        for name, slot in slot_fields(type(params)).items():
            if getattr(params, name) is None and (slot.default is not None or slot.required):
                raise PluginError(
                    f"{self.kind} '{self.name}': its component field '{name}' was not resolved; build it from a "
                    f"spec with srde_core.recipe.resolve_component(plugins, '{self.kind}', {{...}})"
                )
        try:
            factory = resolve_object(self.factory)
        except (ImportError, AttributeError) as err:
            raise PluginError(
                f"{self.kind} '{self.name}' (plugin '{self.provider}'): cannot import {self.factory!r} ({err})"
            ) from None
        built = factory(params, **context)
        return self.contract.check(self, built) if self.contract is not None else built


@dataclass(frozen=True)
class ComponentChoice:
    """A component picked by a recipe: kind, name, validated params (and a weight for losses).

    ``choice.build(**context)`` builds it; a component whose params hold further choices (a delta's
    selector, a trainer's verifier) builds those itself from its params.
    """

    kind: str
    name: str
    params: Params
    weight: Any = None  # losses: a float or a ComponentChoice of kind 'schedule'
    component: Component | None = field(default=None, compare=False, repr=False)

    def build(self, **context: Any) -> Any:
        if self.component is None:
            raise PluginError(f"{self.kind} '{self.name}' was not resolved against the registries")
        return self.component.build(self.params, **context)

    def nested(self) -> Iterator[ComponentChoice]:
        """This choice and every choice held in its params, depth first (a delta's selector, a
        selector's starting selector, ...)."""
        yield self
        for name in type(self.params).model_fields:
            value = getattr(self.params, name)
            if isinstance(value, ComponentChoice):
                yield from value.nested()

    def describe(self) -> dict[str, Any]:
        data = {"name": self.name, **describe_params(self.params)}
        if self.weight is not None:
            data["weight"] = self.weight.describe() if isinstance(self.weight, ComponentChoice) else self.weight
        return data


def iter_choices(value: Any) -> Iterator[ComponentChoice]:
    """Every :class:`ComponentChoice` held in ``value`` (params, a recipe's tables, lists of
    losses), depth first, with the choices nested in their params and the losses' weights."""
    if isinstance(value, ComponentChoice):
        yield value
        yield from iter_choices(value.weight)
        yield from iter_choices(value.params)
    elif isinstance(value, Params):
        for name in type(value).model_fields:
            yield from iter_choices(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_choices(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_choices(item)


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


def _summary(summary: str | None, factory: Any) -> str:
    text = summary or ("" if isinstance(factory, str) else (factory.__doc__ or "").strip())
    return text.splitlines()[0].strip() if text else ""


class Registry:
    """The components of one kind."""

    def __init__(self, kind: Kind):
        self.kind = kind.name
        self.spec = kind
        self._entries: dict[str, Component] = {}
        self._frozen = False

    def add(self, component: Component) -> None:
        _insert_unique(self._entries, component.name, component, frozen=self._frozen, label=self.kind)

    def replace(self, component: Component) -> None:
        """Put ``component`` in place of the one of its name (an explicit override of a built-in)."""
        if self._frozen:
            raise PluginError(f"the {self.kind} registry is frozen; register from srde_register")
        self._entries[component.name] = component

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
    """Every kind's registry plus the plugin settings tables."""

    def __init__(self) -> None:
        self.kinds: dict[str, Registry] = {}
        self.settings: dict[str, SettingsTable] = {}
        self._frozen = False

    def declare(self, kind: Kind) -> None:
        if self._frozen:
            raise PluginError("component kinds are frozen; declare them from srde_add_kinds")
        existing = self.kinds.get(kind.name)
        if existing is not None:
            raise PluginError(
                f"component kind '{kind.name}' is declared twice: by '{existing.spec.provider}' "
                f"and by '{kind.provider}'"
            )
        self.kinds[kind.name] = Registry(kind)

    def __getitem__(self, kind: str) -> Registry:
        try:
            return self.kinds[kind]
        except KeyError:
            raise PluginError(
                f"unknown component kind '{kind}'{did_you_mean(kind, self.kinds)}; {available(self.kinds)}"
            ) from None

    def __contains__(self, kind: object) -> bool:
        return kind in self.kinds

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


class KindRegistrar:
    """What a plugin's ``srde_add_kinds(kinds)`` receives.

    ``kinds.add("reward", "Scores a rollout.", contract="my_pkg.rewards:Reward")``: the contract
    is a class that every built component of the kind must be an instance of (a lazy reference keeps
    the declaring module free of torch), :data:`CALLABLE`, or None.
    """

    def __init__(self, registries: Registries, provider: str):
        self._registries = registries
        self.provider = provider

    def add(self, name: str, summary: str, *, contract: Any = None) -> None:
        if not name.isidentifier():
            raise PluginError(f"plugin '{self.provider}': kind name {name!r} must be an identifier")
        self._registries.declare(Kind(name, summary, contract, self.provider))


class ProviderRegistrar:
    """What a plugin's ``srde_register(registry)`` receives: registers under the plugin's name.

    ``registry.add("scheduler", "cosine", make_cosine, CosineParams, "Cosine decay.")``, with the
    factory a callable or a lazy ``"package.module:attr"``; or, as a decorator,
    ``@registry.component("scheduler", "cosine", CosineParams)`` (the first docstring line becomes
    the summary).
    """

    def __init__(self, registries: Registries, provider: str):
        self._registries = registries
        self.provider = provider

    def add(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any] | str,
        params: type[Params] = NoParams,
        summary: str | None = None,
        *,
        override: bool = False,
    ) -> None:
        """Register ``factory`` as component ``name`` of ``kind``. A name another plugin provides
        is a clash that breaks this plugin (built-ins register first and are never displaced);
        ``override=True`` replaces a built-in of that name on purpose (the run header says so)."""
        if not (isinstance(params, type) and issubclass(params, Params)):
            raise PluginError(
                f"plugin '{self.provider}': {kind} '{name}' params must subclass srde_core.params.Params"
            )
        if isinstance(factory, str):
            if ":" not in factory:
                raise PluginError(f"plugin '{self.provider}': {kind} '{name}' factory {factory!r} is not 'module:attr'")
        elif not callable(factory):
            raise PluginError(f"plugin '{self.provider}': {kind} '{name}' factory is not callable")
        registry = self._registries[kind]
        component = Component(
            kind, name, factory, params, _summary(summary, factory), self.provider, registry.spec, override=override
        )
        registry.add(component)

    def component(
        self, kind: str, name: str, params: type[Params] = NoParams, summary: str | None = None, *, override: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.add(kind, name, factory, params, summary, override=override)
            return factory

        return decorate

    def settings(self, name: str, params: type[Params], summary: str) -> None:
        """Declare the ``[plugins.NAME]`` table this plugin reads its options from."""
        if not (isinstance(params, type) and issubclass(params, Params)):
            raise PluginError(
                f"plugin '{self.provider}': settings '{name}' must subclass srde_core.params.Params"
            )
        self._registries.add_settings(SettingsTable(name, params, summary, self.provider))
