"""The ``conventions`` corpus: one kind of prompt, many meanings.

Every prompt is a tag and a string of random digits (three, four or five: difficulty 1, 2, 3), and
every answer is the string mapped digit by digit. The ``general`` domain is what the base model is
pre-trained on: three maps under their tags, ``[copy] 4719`` -> ``4719``, ``[next]`` (each digit plus
one, mod 10) -> ``5820`` and ``[flip]`` (``9 - d``) -> ``5280``. Each of the six convention domains
asks for another map of the same kind of string, under a tag the base has never seen:

============== ================================ =====================
domain         each digit ``d`` becomes          ``[..] 4719``
============== ================================ =====================
``back``       ``d - 1`` (mod 10)                ``3608``
``turn``       ``d + 5`` (mod 10)                ``9264``
``double``     ``2 d`` (mod 10)                  ``8428``
``triple``     ``3 d`` (mod 10)                  ``2137``
``square``     ``d * d`` (mod 10)                ``6911``
``cipher``     ``CIPHER[d]`` (a fixed shuffle)   ``5684``
============== ================================ =====================

**Domain shift:** the base reads a tag and maps digits, but none of these six maps. **Interference:**
the same digit must become a different digit in every domain, and only the tag tells them apart, so
one shared delta must hold six conditional tables while routed experts can split them by the tag.
The maps are digit-wise, what the MLP projections the experts adapt can learn (the base's attention
already brings each input digit and the tag to the answer positions). A base that applies one of its
own maps is right only by coincidence (a digit that every map of the string leaves alike), so its
accuracy on the six is near 0. Held-out strings are answerable by a model that learned the map:
eval prompts are never train prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

GENERAL = "general"
LENGTHS = {1: 3, 2: 4, 3: 5}  # difficulty -> number of digits


CIPHER = "3810592674"  # the ``cipher`` domain's substitution: digit d becomes CIPHER[d]


def _digitwise(rule: Callable[[int], int | str]) -> Callable[[str], str]:
    return lambda s: "".join(str(rule(int(c))) for c in s)


#: The general domain's tasks, each under its tag: what the base is pre-trained on.
GENERAL_RULES: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "next": _digitwise(lambda d: (d + 1) % 10),
    "flip": _digitwise(lambda d: 9 - d),
}

#: The six conventions: other maps of the same digits, new to the base.
RULES: dict[str, Callable[[str], str]] = {
    "back": _digitwise(lambda d: (d - 1) % 10),
    "turn": _digitwise(lambda d: (d + 5) % 10),
    "double": _digitwise(lambda d: 2 * d % 10),
    "triple": _digitwise(lambda d: 3 * d % 10),
    "square": _digitwise(lambda d: d * d % 10),
    "cipher": _digitwise(lambda d: CIPHER[d]),
}

DOMAINS: tuple[str, ...] = (GENERAL, *RULES)


@dataclass(frozen=True)
class Convention:
    """One domain of the corpus, with the interface of the reasoning domains' modules
    (``NAME``, ``make(rng, difficulty)``, ``check(expected, generated)``)."""

    NAME: str

    def make(self, rng: random.Random, difficulty: int) -> tuple[str, str]:
        digits = "".join(str(rng.randint(0, 9)) for _ in range(LENGTHS[difficulty]))
        if self.NAME == GENERAL:
            tag = rng.choice(tuple(GENERAL_RULES))
            return f"[{tag}] {digits}", GENERAL_RULES[tag](digits)
        return f"[{self.NAME}] {digits}", RULES[self.NAME](digits)

    def check(self, expected: str, generated: str) -> bool:
        """The first word of the continuation equals the answer exactly (digit strings compare as
        text: leading zeros count)."""
        from srde_plugins.data.domains.answers import first_word

        return first_word(generated) == expected.strip()


MODULES = {name: Convention(name) for name in DOMAINS}
