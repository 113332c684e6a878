"""Domain ``logic``: truth values, e.g. ``True and not False?`` -> ``True``.

1: one numeric comparison (``7<12?``); 2: a boolean expression over three literals, or two
comparisons joined by ``and``/``or``; 3: a syllogism over nonsense categories answered
``yes``, ``no`` or ``unknown``.
"""

from __future__ import annotations

import random

from srde_plugins.data.domains.answers import matches

NAME = "logic"

_NAMES = ("Ann", "Bob", "Cat", "Dan", "Eve", "Fox", "Gus", "Ivy", "Max", "Sam", "Tom", "Zoe")
_KINDS = ("wug", "dax", "blick", "fep", "zorp", "glim", "snark", "quib", "tove", "vorn")


def _literal(rng: random.Random) -> str:
    word = rng.choice(("True", "False"))
    return f"not {word}" if rng.random() < 0.3 else word


def _comparison(rng: random.Random) -> str:
    a, b = rng.randint(0, 30), rng.randint(0, 30)
    return f"{a}{rng.choice('<>')}{b}"


def _boolean(rng: random.Random) -> str:
    if rng.random() < 0.5:
        x, y, z = _literal(rng), _literal(rng), _literal(rng)
        op1, op2 = rng.choice(("and", "or")), rng.choice(("and", "or"))
        if rng.random() < 0.5:
            return f"({x} {op1} {y}) {op2} {z}"
        return f"{x} {op1} ({y} {op2} {z})"
    return f"{_comparison(rng)} {rng.choice(('and', 'or'))} {_comparison(rng)}"


def _syllogism(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.sample(_KINDS, 3)
    name = rng.choice(_NAMES)
    kind = rng.randrange(4)
    if kind == 0:
        return f"All {a}s are {b}s. {name} is a {a}. Is {name} a {b}?", "yes"
    if kind == 1:
        return f"No {a}s are {b}s. {name} is a {a}. Is {name} a {b}?", "no"
    if kind == 2:
        return f"All {a}s are {b}s. {name} is a {b}. Is {name} a {a}?", "unknown"
    return f"All {a}s are {b}s. All {b}s are {c}s. {name} is a {a}. Is {name} a {c}?", "yes"


def make(rng: random.Random, difficulty: int) -> tuple[str, str]:
    if difficulty == 3:
        return _syllogism(rng)
    expression = _comparison(rng) if difficulty == 1 else _boolean(rng)
    # Only literals, comparisons of integers, and/or/not: evaluating it is the reference answer.
    value = eval(expression, {"__builtins__": {}})  # noqa: S307
    return f"{expression}?", str(bool(value))


def check(expected: str, generated: str) -> bool:
    return matches(expected, generated)
