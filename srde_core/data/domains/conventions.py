"""The ``conventions`` corpus: one kind of prompt, seven meanings.

Every example is a small integer expression, ``a+b``, ``a-b`` (``a >= b``) or ``a*b``. The
``general`` domain asks for its ordinary value, with the bare prompt ``17+5=?``; it is what the base
model is pre-trained on. Each of the six convention domains asks the same kind of question under a
tag that names its convention, ``[swap] 17+5=?``, and expects another answer:

=========== =============================================== ======================
domain      answer                                           ``[..] 17+5=?``
=========== =============================================== ======================
``general`` the ordinary value                               ``22``
``swap``    ``+`` and ``-`` exchanged (``*`` unchanged)      ``12``
``order``   the operands exchanged: ``b - a`` for ``a - b``  ``22`` (``5-17``: -12)
``offset``  the value plus one                               ``23``
``mod``     the last digit of the value                      ``2``
``reverse`` the digits of the value reversed                 ``22`` (``13``: ``31``)
``cipher``  each digit of the value shifted by 3 (mod 10)    ``55``
=========== =============================================== ======================

The domains interfere: the same operands and operators map to different answers, and only the tag
tells them apart, so one shared delta must hold six conditional rules, while routed experts can
split them by the tag. A base that answers the ordinary value is right on part of some domains
(``order`` on ``+`` and ``*``, ``mod`` and ``reverse`` on one-digit values, ``swap`` on ``*``) and
almost never on ``offset`` and ``cipher``.

Difficulty 1: one-digit operands (``+``, ``-``); 2: operands up to 19 (``+``, ``-``); 3: a product of
one-digit factors, or ``+`` / ``-`` with operands up to 30 (small ranges: the tiny base must learn
ordinary arithmetic well enough for its answers to be checkable).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

GENERAL = "general"


def _operands(rng: random.Random, difficulty: int) -> tuple[int, str, int]:
    if difficulty == 1:
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
    elif difficulty == 2:
        a, b, op = rng.randint(0, 19), rng.randint(0, 19), rng.choice("+-")
    elif rng.random() < 0.5:
        a, b, op = rng.randint(2, 9), rng.randint(2, 9), "*"
    else:
        a, b, op = rng.randint(10, 30), rng.randint(0, 30), rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def _value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _cipher(value: int) -> str:
    return "".join(str((int(c) + 3) % 10) if c.isdigit() else c for c in str(value))


RULES: dict[str, Callable[[int, str, int], str]] = {
    GENERAL: lambda a, op, b: str(_value(a, op, b)),
    "swap": lambda a, op, b: str(_value(a, {"+": "-", "-": "+"}.get(op, op), b)),
    "order": lambda a, op, b: str(_value(b, op, a)),
    "offset": lambda a, op, b: str(_value(a, op, b) + 1),
    "mod": lambda a, op, b: str(_value(a, op, b) % 10),
    "reverse": lambda a, op, b: str(_value(a, op, b))[::-1],
    "cipher": lambda a, op, b: _cipher(_value(a, op, b)),
}

DOMAINS: tuple[str, ...] = tuple(RULES)


@dataclass(frozen=True)
class Convention:
    """One domain of the corpus, with the interface of the reasoning domains' modules
    (``NAME``, ``make(rng, difficulty)``, ``check(expected, generated)``)."""

    NAME: str

    def make(self, rng: random.Random, difficulty: int) -> tuple[str, str]:
        a, op, b = _operands(rng, difficulty)
        tag = "" if self.NAME == GENERAL else f"[{self.NAME}] "
        return f"{tag}{a}{op}{b}=?", RULES[self.NAME](a, op, b)

    def check(self, expected: str, generated: str) -> bool:
        """The first word of the continuation equals the answer exactly (``reverse`` answers such
        as ``"01"`` keep their leading zero, so numbers compare as text)."""
        from srde_core.data.domains.answers import first_word

        return first_word(generated) == expected.strip()


MODULES = {name: Convention(name) for name in DOMAINS}
