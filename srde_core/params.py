"""Typed argument schemas.

Every component declares its arguments as a ``Params`` subclass: field types, defaults, ranges
(``Field(gt=0)``) and help text (``Field(description=...)``) live in one place. Validation is
strict (TOML gives real types, so ``"3"`` is not an int), unknown keys are errors, and the result
is frozen so nothing downstream can change a resolved recipe.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base class for component arguments and recipe sections."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, protected_namespaces=())


class NoParams(Params):
    """For components that take no arguments."""
