"""The verifier contract and the built-in `answer` verifier (see :mod:`srde_plugins.rl`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any


class Verifier(ABC):
    """Scores a sampled answer to one training example."""

    @abstractmethod
    def score(self, example: Mapping[str, Any], text: str, tokens: Sequence[int]) -> float:
        """The reward of the continuation ``text`` (its token ids ``tokens``, EOS excluded) of
        ``example``'s prompt (a training row: ``prompt``, ``answer``, ``domain``, ...)."""

    def bind(self, data) -> None:
        """Called once before the phase with the run's data (a :class:`~srde_core.data.DataBundle`)."""


class AnswerVerifier(Verifier):
    """1.0 when the continuation answers the example (as `srde eval` checks accuracy), else 0.0."""

    def __init__(self, params=None):
        self.params = params
        self.corpus = None

    def bind(self, data) -> None:
        self.corpus = getattr(data, "corpus", None)  # a generated corpus checks its own answers

    def score(self, example, text, tokens) -> float:
        from srde_core.evaluate.accuracy import is_correct

        return 1.0 if is_correct(example["domain"], example["answer"], text, self.corpus) else 0.0
