"""Domain ``planning``: fewest moves and orderings, e.g. ``Steps from (1,4) to (3,0)?`` -> ``6``.

1: fewest grid steps between two cells (up/down/left/right); 2: the order of three tasks given
``X before Y`` constraints (``BAC``); 3: four tasks, or the fewest ``+a`` / ``*2`` moves from a
start number to a goal (breadth-first search).
"""

from __future__ import annotations

import random
from collections import deque

from srde_plugins.data.domains.answers import matches

NAME = "planning"

_TASKS = "ABCDEFGH"


def fewest_moves(start: int, goal: int, add: int) -> int:
    """Fewest ``+add`` or ``*2`` moves from ``start`` to ``goal`` (both positive, goal > start)."""
    seen, queue = {start}, deque([(start, 0)])
    while queue:
        value, moves = queue.popleft()
        if value == goal:
            return moves
        for nxt in (value + add, value * 2):
            if nxt <= goal and nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, moves + 1))
    raise ValueError(f"{goal} is unreachable from {start}")


def _grid(rng: random.Random) -> tuple[str, str]:
    x1, y1, x2, y2 = (rng.randint(0, 6) for _ in range(4))
    return f"Steps from ({x1},{y1}) to ({x2},{y2})?", str(abs(x1 - x2) + abs(y1 - y2))


def _ordering(rng: random.Random, count: int) -> tuple[str, str]:
    order = rng.sample(_TASKS, count)
    rules = [f"{a} before {b}" for a, b in zip(order, order[1:])]
    rng.shuffle(rules)
    return f"{', '.join(rules)}. Order?", "".join(order)


def _moves(rng: random.Random) -> tuple[str, str]:
    start, add = rng.randint(1, 9), rng.choice((1, 3))
    goal = rng.randint(start + 1, 40)
    # +1 reaches every goal; with +3 some goals are unreachable, so fall back to +1 for those.
    try:
        moves = fewest_moves(start, goal, add)
    except ValueError:
        add, moves = 1, fewest_moves(start, goal, 1)
    return f"From {start} to {goal} with +{add} or *2. Fewest moves?", str(moves)


def make(rng: random.Random, difficulty: int) -> tuple[str, str]:
    if difficulty == 1:
        return _grid(rng)
    if difficulty == 2:
        return _ordering(rng, 3)
    return _ordering(rng, 4) if rng.random() < 0.5 else _moves(rng)


def check(expected: str, generated: str) -> bool:
    return matches(expected, generated)
