"""The six generated reasoning domains.

Each module provides ``NAME`` (the domain label), ``make(rng, difficulty) -> (question, answer)``
drawing one instance from a ``random.Random`` at difficulty 1, 2 or 3, and
``check(expected, generated) -> bool``. The prompt template lives in :mod:`srde_plugins.data.corpora`.
"""

from __future__ import annotations

from srde_plugins.data.domains import arithmetic, logic, patterns, planning, programs, science

MODULES = {m.NAME: m for m in (arithmetic, programs, logic, science, planning, patterns)}
