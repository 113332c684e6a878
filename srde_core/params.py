"""Typed argument schemas.

Every component declares its arguments as a ``Params`` subclass: field types, defaults, ranges
(``Field(gt=0)``) and help text (``Field(description=...)``) live in one place. Validation is
strict (TOML gives real types, so ``"3"`` is not an int), unknown keys are errors, and the result
is frozen so nothing downstream can change a resolved recipe.

A field may hold *another component*, picked by name like any recipe slot::

    class SparseDeltaParams(Params):
        density: float = 0.01
        selector: ComponentChoice = component("selector", "magnitude", "which positions change")

The recipe then takes ``selector = "random"`` or ``selector = { name = "magnitude", ... }`` there;
it is resolved against the registries (its own arguments validated) before the outer params are,
and the factory receives a :class:`~srde_core.registry.ComponentChoice` it builds with
``params.selector.build(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    """Base class for component arguments and recipe sections."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, protected_namespaces=(), arbitrary_types_allowed=True
    )


class NoParams(Params):
    """For components that take no arguments."""


@dataclass(frozen=True)
class Slot:
    """Marks a params field as a component of ``kind`` (see :func:`component`)."""

    kind: str
    default: Any = None  # a name, a table, a list of those (many), or None: optional
    many: bool = False
    weighted: bool = False  # entries may carry a `weight` (a number or a schedule)
    required: bool = False


_SLOT_KEY = "srde_slot"


def component(
    kind: str,
    default: Any = None,
    description: str = "",
    *,
    many: bool = False,
    weighted: bool = False,
    required: bool = False,
) -> Any:
    """A params field that names a component of ``kind`` (``many``: an array of them).

    ``default`` is what the recipe gets when it leaves the key out (a name or a table); without
    one the slot is optional (the field is then None), or, with ``required``, must be given.
    """
    slot = Slot(kind, default, many, weighted, required)
    return Field(default=() if many else None, description=description, json_schema_extra={_SLOT_KEY: slot.__dict__})


def slot_of(field_info: Any) -> Slot | None:
    extra = getattr(field_info, "json_schema_extra", None)
    if isinstance(extra, dict) and _SLOT_KEY in extra:
        return Slot(**extra[_SLOT_KEY])
    return None


def slot_fields(cls: type[Params]) -> dict[str, Slot]:
    return {name: slot for name, info in cls.model_fields.items() if (slot := slot_of(info)) is not None}


def describe_params(params: Params) -> dict[str, Any]:
    """The plain-data (JSON) form of resolved params: component fields as ``{"name", ...}`` tables."""
    slots = slot_fields(type(params))
    nested = {name for name, value in params if isinstance(value, Params) or _is_params_list(value)}
    data = params.model_dump(mode="json", exclude=set(slots) | nested)
    for name in slots:
        value = getattr(params, name)
        if value is None:
            data[name] = None
        elif isinstance(value, tuple):
            data[name] = [v.describe() for v in value]
        else:
            data[name] = value.describe()
    for name in nested:
        value = getattr(params, name)
        data[name] = [describe_params(v) for v in value] if _is_params_list(value) else describe_params(value)
    return {name: data[name] for name in type(params).model_fields if name in data}


def _is_params_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Params) for v in value)
