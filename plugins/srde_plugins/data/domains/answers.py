"""Reading a model's generated continuation as an answer, shared by every domain's checker."""

from __future__ import annotations

_EDGE_PUNCTUATION = ".,;:!?\"'`"


def first_word(generated: str) -> str:
    """The first whitespace-separated word of ``generated``, without surrounding punctuation.

    A continuation such as ``" 42\\nQ: ..."`` or ``" True."`` reads as ``"42"`` / ``"True"``. A
    leading minus sign is kept, so ``" -3"`` reads as ``"-3"``.
    """
    words = generated.split()
    return words[0].strip(_EDGE_PUNCTUATION) if words else ""


def matches(expected: str, generated: str) -> bool:
    """Whether the first word of ``generated`` is ``expected``.

    Integers compare by value (``"042"`` matches ``"42"``); words compare case-insensitively.
    """
    word = first_word(generated)
    if not word:
        return False
    try:
        return int(word) == int(expected)
    except ValueError:
        return word.casefold() == expected.strip().casefold()
