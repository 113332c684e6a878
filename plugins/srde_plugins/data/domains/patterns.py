"""Domain ``patterns``: continue a sequence, e.g. ``2,4,6,8,?`` -> ``10``.

1: a small arithmetic progression, or a period-2 letter pattern; 2: larger or falling
progressions, letter progressions, period-3 patterns; 3: geometric, Fibonacci-like, squares plus
a constant, or alternating steps.
"""

from __future__ import annotations

import random
import string

from srde_plugins.data.domains.answers import matches

NAME = "patterns"

_LETTERS = string.ascii_uppercase


def _show(terms: list, answer) -> tuple[str, str]:
    return ",".join(str(t) for t in terms) + ",?", str(answer)


def _periodic(rng: random.Random, period: int, shown: int) -> tuple[str, str]:
    cycle = rng.sample(_LETTERS, period)
    seq = [cycle[i % period] for i in range(shown + 1)]
    return _show(seq[:-1], seq[-1])


def _progression(start: int, step: int, shown: int) -> tuple[str, str]:
    seq = [start + step * i for i in range(shown + 1)]
    return _show(seq[:-1], seq[-1])


def make(rng: random.Random, difficulty: int) -> tuple[str, str]:
    kind = rng.randrange(4)
    if difficulty == 1:
        if kind < 2:
            return _progression(rng.randint(0, 20), rng.randint(1, 5), 4)
        return _periodic(rng, 2, 5)
    if difficulty == 2:
        if kind == 0:
            return _progression(rng.randint(0, 30), rng.randint(6, 12), 4)
        if kind == 1:
            step = rng.randint(1, 9)
            return _progression(rng.randint(4 * step, 60), -step, 4)
        if kind == 2:
            step = rng.randint(1, 3)
            first = rng.randrange(len(_LETTERS) - 4 * step)
            seq = [_LETTERS[first + step * i] for i in range(5)]
            return _show(seq[:-1], seq[-1])
        return _periodic(rng, 3, 5)
    if kind == 0:
        start, ratio = rng.randint(1, 5), rng.choice((2, 3))
        seq = [start * ratio**i for i in range(5)]
        return _show(seq[:-1], seq[-1])
    if kind == 1:
        seq = [rng.randint(1, 9), rng.randint(1, 9)]
        while len(seq) < 6:
            seq.append(seq[-1] + seq[-2])
        return _show(seq[:-1], seq[-1])
    if kind == 2:
        offset, first = rng.randint(0, 9), rng.randint(1, 4)
        seq = [(first + i) ** 2 + offset for i in range(5)]
        return _show(seq[:-1], seq[-1])
    up, down = rng.randint(2, 9), rng.randint(1, 5)
    seq = [rng.randint(0, 20)]
    while len(seq) < 6:
        seq.append(seq[-1] + (up if len(seq) % 2 else -down))
    return _show(seq[:-1], seq[-1])


def check(expected: str, generated: str) -> bool:
    return matches(expected, generated)
