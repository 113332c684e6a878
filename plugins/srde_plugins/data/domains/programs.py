"""Domain ``code``: what a tiny Python program prints, e.g. ``x=3;x+=4;print(x*2)`` -> ``14``.

1: one assignment and a printed expression; 2: two or three straight-line statements;
3: a ``for`` loop or an ``if``/``else``. Every program is real Python: the answer is computed by
running it, so the prompt and the answer cannot drift apart.
"""

from __future__ import annotations

import random

from srde_plugins.data.domains.answers import matches

NAME = "code"

_OPS = ("+", "-", "*")


def run_program(source: str) -> str:
    """Run ``source`` (one of our generated programs) and return what it printed, stripped."""
    printed: list[str] = []

    def capture(*args: object) -> None:
        printed.append(" ".join(str(a) for a in args))

    exec(compile(source, "<corpus>", "exec"), {"print": capture})  # noqa: S102 - our own programs
    return "\n".join(printed).strip()


def _operand(rng: random.Random, op: str) -> int:
    return rng.randint(2, 4) if op == "*" else rng.randint(1, 9)


def _program(rng: random.Random, difficulty: int) -> str:
    if difficulty == 1:
        op = rng.choice(_OPS)
        return f"x={rng.randint(0, 20)};print(x{op}{_operand(rng, op)})"
    if difficulty == 2:
        if rng.random() < 0.5:
            op1, op2 = rng.choice(_OPS), rng.choice(_OPS)
            return f"x={rng.randint(0, 12)};x{op1}={_operand(rng, op1)};print(x{op2}{_operand(rng, op2)})"
        op1, op2 = rng.choice(_OPS), rng.choice(_OPS)
        return f"a={rng.randint(0, 9)};b=a{op1}{_operand(rng, op1)};print(b{op2}a)"
    kind = rng.randrange(3)
    if kind == 0:
        return f"s=0\nfor i in range({rng.randint(2, 7)}): s+=i\nprint(s)"
    if kind == 1:
        start, n, k = rng.randint(0, 9), rng.randint(2, 5), rng.randint(2, 9)
        return f"s={start}\nfor i in range({n}): s+={k}\nprint(s)"
    x, limit, dec, inc = rng.randint(0, 15), rng.randint(3, 12), rng.randint(1, 5), rng.randint(1, 5)
    return f"x={x}\nif x>{limit}: x-={dec}\nelse: x+={inc}\nprint(x)"


def make(rng: random.Random, difficulty: int) -> tuple[str, str]:
    source = _program(rng, difficulty)
    return source, run_program(source)


def check(expected: str, generated: str) -> bool:
    return matches(expected, generated)
