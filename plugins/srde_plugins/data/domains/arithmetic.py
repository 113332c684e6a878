"""Domain ``math``: integer arithmetic, e.g. ``17+25=?`` -> ``42``.

1: one + or - on numbers up to 20; 2: two-digit + and -, or a times table up to 12;
3: three operands with precedence or parentheses.
"""

from __future__ import annotations

import random

from srde_plugins.data.domains.answers import matches

NAME = "math"


def make(rng: random.Random, difficulty: int) -> tuple[str, str]:
    if difficulty == 1:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            return f"{a}+{b}=?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}=?", str(a - b)
    if difficulty == 2:
        kind = rng.randrange(3)
        if kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            return f"{a}*{b}=?", str(a * b)
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if kind == 0:
            return f"{a}+{b}=?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}=?", str(a - b)
    kind = rng.randrange(3)
    if kind == 0:
        a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
        return f"({a}+{b})*{c}=?", str((a + b) * c)
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c = rng.randint(0, a * b)
        return f"{a}*{b}-{c}=?", str(a * b - c)
    a, b, c = rng.randint(10, 60), rng.randint(10, 60), rng.randint(1, 9)
    return f"{a}+{b}-{c}=?", str(a + b - c)


def check(expected: str, generated: str) -> bool:
    return matches(expected, generated)
