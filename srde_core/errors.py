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
