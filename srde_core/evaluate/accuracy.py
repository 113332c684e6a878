"""Answer accuracy per domain: greedy continuation of BOS + prompt, checked against the answer.

A generated corpus reads the answers itself (:meth:`srde_core.data.corpus.Corpus.check`; the
reasoning corpus: the first word, integers by value). Other data compares the first line of the
continuation with the answer's first line, whitespace-normalised and case-sensitive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from srde_core.data.corpus import Corpus, first_line_matches
from srde_core.evaluate.generation import greedy_generate

#: ``generate(model, prompts, *, max_new_tokens, pad_id, eos_id, batch_size, device) -> new ids``,
#: the signature of :func:`greedy_generate` (tests pass a stand-in).
Generator = Callable[..., list[list[int]]]


@dataclass(frozen=True)
class DomainAccuracy:
    domain: str
    correct: int
    examples: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else math.nan


def is_correct(domain: str, expected: str, generated: str, corpus: Corpus | None = None) -> bool:
    """Whether the continuation ``generated`` answers ``expected`` (see the module docstring);
    ``corpus``: the generated corpus the example came from."""
    if corpus is not None:
        return corpus.check(domain, expected, generated)
    return first_line_matches(expected, generated)


def answer_accuracy(
    model,
    rows,
    tokenizer,
    domains: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device=None,
    generate: Generator = greedy_generate,
    corpus: Corpus | None = None,
) -> dict[str, DomainAccuracy]:
    """Correct answers per domain over ``rows`` (eval rows with ``input_ids``, ``prompt_len``,
    ``domain`` and ``answer``; ``corpus``: the generated corpus they came from). Every domain of ``domains`` is in the result, with 0 examples if
    ``rows`` has none. The model runs as it is: wrap the call in
    :func:`srde_core.evaluate.evaluation_state` to pick base or SRDE."""
    columns = rows[:]  # one column-wise read instead of a row object per example
    prompts = [ids[:n] for ids, n in zip(columns["input_ids"], columns["prompt_len"])]
    continuations = generate(
        model, prompts, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
        batch_size=batch_size, device=device,
    )
    correct = {d: 0 for d in domains}
    total = {d: 0 for d in domains}
    for domain, answer, ids in zip(columns["domain"], columns["answer"], continuations):
        total[domain] = total.get(domain, 0) + 1
        correct[domain] = correct.get(domain, 0) + int(is_correct(domain, answer, tokenizer.decode(ids), corpus))
    return {d: DomainAccuracy(d, correct[d], total[d]) for d in total}
