"""Domain ``science``: integer answers from units and formulas, e.g. ``3 km in m?`` -> ``3000``.

1: a unit conversion; 2: one formula with two givens (F=m*a, weight with g=10, v=d/t, density,
P=V*I, W=F*d, V=I*R); 3: kinetic/potential energy, momentum change, or a two-leg distance.
Givens are chosen so that every answer is an integer.
"""

from __future__ import annotations

import random

from srde_plugins.data.domains.answers import matches

NAME = "science"

_CONVERSIONS = (
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("cm", "mm", 10),
    ("kg", "g", 1000),
    ("L", "mL", 1000),
    ("h", "min", 60),
    ("min", "s", 60),
    ("d", "h", 24),
)


def _conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_CONVERSIONS)
    n = rng.randint(1, 20)
    if rng.random() < 0.5:
        return f"{n} {big} in {small}?", str(n * factor)
    return f"{n * factor} {small} in {big}?", str(n)


def _formula(rng: random.Random) -> tuple[str, str]:
    x, y = rng.randint(1, 12), rng.randint(1, 12)
    kind = rng.randrange(7)
    if kind == 0:
        return f"m={x} kg, a={y} m/s2. Force in N?", str(x * y)
    if kind == 1:
        return f"m={x} kg, g=10 m/s2. Weight in N?", str(10 * x)
    if kind == 2:
        return f"d={x * y} m, t={y} s. Speed in m/s?", str(x)
    if kind == 3:
        return f"m={x * y} g, V={y} cm3. Density in g/cm3?", str(x)
    if kind == 4:
        return f"V={x} V, I={y} A. Power in W?", str(x * y)
    if kind == 5:
        return f"F={x} N, d={y} m. Work in J?", str(x * y)
    return f"I={x} A, R={y} ohm. Voltage in V?", str(x * y)


def _energy(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        m, v = rng.randint(1, 10), rng.randint(1, 10)
        if m * v * v % 2:
            m += 1
        return f"m={m} kg, v={v} m/s. Kinetic energy in J?", str(m * v * v // 2)
    if kind == 1:
        m, h = rng.randint(1, 10), rng.randint(1, 10)
        return f"m={m} kg, h={h} m, g=10 m/s2. Potential energy in J?", str(10 * m * h)
    if kind == 2:
        m, v1, v2 = rng.randint(1, 10), rng.randint(0, 5), rng.randint(6, 12)
        return f"m={m} kg speeds up from {v1} to {v2} m/s. Momentum change in kg*m/s?", str(m * (v2 - v1))
    v1, t1, v2, t2 = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    return f"{v1} m/s for {t1} s, then {v2} m/s for {t2} s. Distance in m?", str(v1 * t1 + v2 * t2)


def make(rng: random.Random, difficulty: int) -> tuple[str, str]:
    return (_conversion, _formula, _energy)[difficulty - 1](rng)


def check(expected: str, generated: str) -> bool:
    return matches(expected, generated)
