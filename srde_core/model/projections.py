"""The MLP projections an SRDE layer can give deltas: named and checked in one place (no torch)."""

from __future__ import annotations

from collections.abc import Iterable

PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def check_projections(names: Iterable[str]) -> tuple[str, ...]:
    """Distinct names from :data:`PROJECTIONS`, returned in canonical order.

    :raises ValueError: for an empty list, an unknown name or a name given twice.
    """
    names = tuple(names)
    unknown = [p for p in names if p not in PROJECTIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"projections must be distinct names from {', '.join(PROJECTIONS)}, got {list(names)}")
    # Canonical order, so the structure (and a seeded generator's draws) do not depend on spelling.
    return tuple(p for p in PROJECTIONS if p in names)
