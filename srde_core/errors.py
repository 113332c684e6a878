"""User-facing errors: one line that names the file and the key, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SRDEError(Exception):
    """An error the user can act on. The CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message = message
        self.source = source
        self.key = key
        super().__init__(self.line())

    def line(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        return ": ".join([*parts, self.message])


class RecipeError(SRDEError):
    """The recipe (or a --set override) is malformed or does not validate."""

    exit_code = 2


class UsageError(SRDEError):
    """The command line (an option's value) is wrong."""

    exit_code = 2


class PluginError(SRDEError):
    """A plugin failed to load or registered something invalid."""

    exit_code = 2


class DataError(SRDEError):
    """Input data is missing or malformed."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def available(choices: Iterable[str]) -> str:
    names = sorted(choices)
    return "available: " + (", ".join(names) if names else "none")


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line (whitespace folded, long messages cut)."""
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frames(err: BaseException):
    """The frames of ``err``'s traceback, innermost first."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return reversed(frames)


def _code(function) -> object:
    function = getattr(function, "__func__", function)
    return getattr(function, "__code__", None)


def plugin_failure(err: BaseException, plugins) -> tuple[str, str | None] | None:
    """``(plugin, what)`` when ``err`` was raised by a plugin's code: ``what`` is ``"hook NAME"``,
    ``"KIND 'NAME'"`` (a component: its factory or its methods) or None (elsewhere in the plugin's
    package); None when no plugin code is on the traceback (a bug of the core, which is shown as
    one). Read from the traceback's frames against what ``plugins`` (a PluginSet) registered."""
    from srde_core.plugins import CORE_PLUGIN
    from srde_core.registry import Component

    hooks: dict[object, tuple[str, str]] = {}
    for name, caller in vars(plugins.manager.hook).items():
        if not name.startswith("srde_") or not hasattr(caller, "get_hookimpls"):
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin_name != CORE_PLUGIN and _code(impl.function) is not None:
                hooks[_code(impl.function)] = (impl.plugin_name, f"hook {name}")
    components: dict[tuple[str, str], tuple[str, str]] = {}  # (module, top-level name) -> (plugin, what)
    for component in plugins.registries.components():
        factory = component.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
        else:
            module, attr = getattr(factory, "__module__", ""), getattr(factory, "__qualname__", "")
        components.setdefault((module, attr.split(".")[0]), (component.provider, f"{component.kind} '{component.name}'"))
    packages: dict[str, str] = {}
    for plugin in plugins.manager.get_plugins():
        name = plugins.manager.get_name(plugin)
        if name != CORE_PLUGIN:
            module = getattr(plugin, "__name__", None) if isinstance(getattr(plugin, "__name__", None), str) \
                else type(plugin).__module__
            packages[module] = name
    build = _code(Component.build)
    fallback = None
    for frame in _frames(err):
        code = frame.f_code
        if code in hooks:
            return hooks[code]
        if code is build:
            component = frame.f_locals.get("self")
            if isinstance(component, Component) and component.provider != CORE_PLUGIN:
                return component.provider, f"{component.kind} '{component.name}'"
        module = frame.f_globals.get("__name__", "")
        qualname = getattr(code, "co_qualname", code.co_name)
        found = components.get((module, qualname.split(".")[0]))
        if found is not None and found[0] != CORE_PLUGIN:
            return found
        if fallback is None:
            for package, name in packages.items():
                if module == package or module.startswith(package + "."):
                    fallback = (name, None)
                    break
    return fallback


def undecodable_file(err: UnicodeDecodeError) -> str | None:
    """The file whose bytes ``err`` could not decode, read from the decoding frame's locals."""
    import os

    for frame in _frames(err):
        for name in ("shown", "path", "file", "filename", "name"):
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value) and os.path.isfile(value):
                return str(value)
    return None
