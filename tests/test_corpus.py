"""The generated six-domain corpus: determinism, balance, checkable answers, disjoint splits."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from srde_core.data.corpus import write_corpus
from srde_plugins.data.corpora import DOMAINS, build_corpus, check, generate
from srde_plugins.data.domains.planning import fewest_moves
from srde_plugins.data.generator import GeneratedCorpus
from srde_core.data.tokenizer import load_tokenizer
from srde_core.data.params import TokenizerParams


def _wrong(answer: str) -> str:
    if answer.lstrip("-").isdigit():
        return str(int(answer) + 1)
    return {"True": "False", "False": "True", "yes": "no", "no": "unknown", "unknown": "yes"}.get(answer, answer + "X")


def test_same_seed_gives_identical_examples_and_other_seeds_differ():
    for domain in DOMAINS:
        assert generate(domain, 60, seed=3) == generate(domain, 60, seed=3)
        assert generate(domain, 60, seed=3) != generate(domain, 60, seed=4)
    assert generate("math", 9, seed=1, difficulty=2) == generate("math", 9, seed=1, difficulty=2)


def test_output_does_not_depend_on_the_process_hash_seed():
    code = "import json; from srde_plugins.data.corpora import build_corpus; print(json.dumps(build_corpus(20, 5, 7)))"
    outputs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0]) == [list(part) for part in build_corpus(20, 5, 7)]


def test_every_domain_has_every_difficulty_in_balance():
    for domain in DOMAINS:
        examples = generate(domain, 30, seed=0)
        assert Counter(e["difficulty"] for e in examples) == {1: 10, 2: 10, 3: 10}
        assert {e["domain"] for e in examples} == {domain}
        assert all(e["prompt"].startswith("Q: ") and e["prompt"].endswith("\nA:") for e in examples)
        assert all(e["answer"] and e["answer"] == e["answer"].strip() and " " not in e["answer"] for e in examples)
        assert all(generate(domain, 5, seed=0, difficulty=level)[i]["difficulty"] == level
                   for level in (1, 2, 3) for i in range(5))


def test_each_answer_passes_its_checker_and_a_wrong_one_fails():
    for domain in DOMAINS:
        for example in generate(domain, 90, seed=11):
            expected = example["answer"]
            for continuation in (f" {expected}", f" {expected}\nQ: 1+1=?", f"{expected}.", f" {expected.lower()}"):
                assert check(domain, expected, continuation), (domain, expected, continuation)
            assert not check(domain, expected, f" {_wrong(expected)}"), (domain, expected)
            assert not check(domain, expected, "")
            assert not check(domain, expected, f" maybe {expected}")


def test_checker_compares_integers_by_value_and_keeps_the_sign():
    assert check("math", "42", " 042")
    assert check("math", "-3", " -3\n")
    assert not check("math", "3", " -3")
    with pytest.raises(ValueError, match="unknown domain"):
        check("poetry", "x", "x")


def test_answers_agree_with_independent_oracles():
    for example in generate("code", 60, seed=5):
        source = example["prompt"].removeprefix("Q: ").removesuffix("\nA:")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(source, {})  # noqa: S102 - generated test programs
        assert out.getvalue().strip() == example["answer"], source
    for example in generate("logic", 60, seed=5):
        question = example["prompt"].removeprefix("Q: ").removesuffix("?\nA:")
        if example["difficulty"] < 3:
            assert str(bool(eval(question))) == example["answer"], question  # noqa: S307
    for example in generate("planning", 60, seed=5, difficulty=2):
        order = example["answer"]
        rules = example["prompt"].removeprefix("Q: ").split(". ")[0].split(", ")
        assert all(order.index(r[0]) < order.index(r[-1]) for r in rules)
    assert fewest_moves(3, 12, 3) == 2 and fewest_moves(1, 8, 1) == 3


def test_write_corpus_splits_are_disjoint_balanced_and_cached(tmp_path, monkeypatch):
    train_path, eval_path = write_corpus(tmp_path, examples_per_domain=60, eval_per_domain=12, seed=2)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    evals = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert Counter(e["domain"] for e in train) == {d: 60 for d in DOMAINS}
    assert Counter(e["domain"] for e in evals) == {d: 12 for d in DOMAINS}
    assert Counter((e["domain"], e["difficulty"]) for e in evals) == {(d, k): 4 for d in DOMAINS for k in (1, 2, 3)}
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in evals}
    assert len({e["prompt"] for e in evals}) == len(evals)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 2 and manifest["parameters"]["examples_per_domain"] == 60
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    before = train_path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("corpus regenerated although it is up to date")

    monkeypatch.setattr(GeneratedCorpus, "splits", fail)
    assert write_corpus(tmp_path, 60, 12, 2) == (train_path, eval_path)
    assert train_path.stat().st_mtime_ns == before
    monkeypatch.undo()

    train_path.write_text("tampered\n")
    write_corpus(tmp_path, 60, 12, 2)
    assert [json.loads(line) for line in train_path.read_text().splitlines()] == train
    write_corpus(tmp_path, 30, 12, 2)
    assert len(train_path.read_text().splitlines()) == 30 * len(DOMAINS)


def test_a_small_space_that_cannot_fill_the_request_fails_clearly():
    with pytest.raises(ValueError, match="too few distinct prompts"):
        build_corpus(examples_per_domain=1, eval_per_domain=3000, seed=0)


def test_prompt_and_answer_fit_in_64_tokens():
    tokenizer = load_tokenizer(TokenizerParams())
    train, evals = build_corpus(examples_per_domain=150, eval_per_domain=30, seed=9)
    longest = {d: 0 for d in DOMAINS}
    for example in train + evals:
        n = len(tokenizer.encode(f"{example['prompt']} {example['answer']}", bos=True, eos=True))
        longest[example["domain"]] = max(longest[example["domain"]], n)
    assert all(n < 64 for n in longest.values()), longest
    answer_tokens = max(len(tokenizer.encode(e["answer"], bos=False, eos=False)) for e in train)
    assert answer_tokens <= 6


# ---------------------------------------------------------------------------------------------
# Independent oracles: each reads the question text alone and computes the answer with code of its
# own (parsers, a syllogism reasoner, a DP instead of BFS, rules fitted to the sequence), for every
# domain and difficulty. Each returns (kind, answer); the kinds seen prove every kind of question
# was checked.
# ---------------------------------------------------------------------------------------------

import itertools
import re


def _question(example: dict) -> str:
    prompt = example["prompt"]
    assert prompt.startswith("Q: ") and prompt.endswith("\nA:"), prompt
    return prompt[3:-3]


class _Parser:
    """A recursive-descent parser over a token list (shared by the arithmetic and boolean oracles)."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        assert token is not None and (expected is None or token == expected), (self.tokens, self.pos, expected)
        self.pos += 1
        return token


def _arithmetic(text: str) -> int:
    """Integers, + - * and parentheses, with the usual precedence."""
    tokens = re.findall(r"\d+|[-+*()]", text)
    assert "".join(tokens) == text, text
    p = _Parser(tokens)

    def expression() -> int:
        value = term()
        while p.peek() in ("+", "-"):
            value = value + term() if p.take() == "+" else value - term()
        return value

    def term() -> int:
        value = atom()
        while p.peek() == "*":
            p.take()
            value *= atom()
        return value

    def atom() -> int:
        if p.peek() == "(":
            p.take("(")
            value = expression()
            p.take(")")
            return value
        return int(p.take())

    value = expression()
    assert p.peek() is None, text
    return value


def _math_oracle(question: str) -> tuple[str, str]:
    assert question.endswith("=?"), question
    expression = question[:-2]
    return re.sub(r"\d+", "n", expression), str(_arithmetic(expression))


def _code_oracle(question: str) -> tuple[str, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(question, {})  # noqa: S102 - the generated program, run by the real interpreter
    kind = "for" if "for " in question else "if" if "if " in question else f"{question.count(';')} statements"
    return kind, out.getvalue().strip()


def _boolean(text: str) -> bool:
    """True/False, not, and, or, parentheses, and integer comparisons with < and >."""
    tokens = re.findall(r"\d+|[<>()]|True|False|not|and|or", text)
    assert "".join(tokens) == text.replace(" ", ""), text
    p = _Parser(tokens)

    def disjunction() -> bool:
        value = conjunction()
        while p.peek() == "or":
            p.take()
            right = conjunction()
            value = value or right
        return value

    def conjunction() -> bool:
        value = negation()
        while p.peek() == "and":
            p.take()
            right = negation()
            value = value and right
        return value

    def negation() -> bool:
        if p.peek() == "not":
            p.take()
            return not negation()
        return atom()

    def atom() -> bool:
        token = p.take()
        if token == "(":
            value = disjunction()
            p.take(")")
            return value
        if token in ("True", "False"):
            return token == "True"
        left, op, right = int(token), p.take(), int(p.take())
        return left < right if op == "<" else left > right

    value = disjunction()
    assert p.peek() is None, text
    return value


def _syllogism(question: str) -> tuple[str, str]:
    """Premises 'All As are Bs.' / 'No As are Bs.' / 'X is a A.', then 'Is X a C?'."""
    *premises, query = question.split(". ")
    subsets: dict[str, set[str]] = {}
    disjoint: set[frozenset[str]] = set()
    member: dict[str, set[str]] = {}
    for premise in premises:
        if m := re.fullmatch(r"All (\w+)s are (\w+)s", premise):
            subsets.setdefault(m[1], set()).add(m[2])
        elif m := re.fullmatch(r"No (\w+)s are (\w+)s", premise):
            disjoint.add(frozenset((m[1], m[2])))
        elif m := re.fullmatch(r"(\w+) is a (\w+)", premise):
            member.setdefault(m[1], set()).add(m[2])
        else:
            raise AssertionError(f"unknown premise {premise!r}")
    m = re.fullmatch(r"Is (\w+) a (\w+)\?", query)
    assert m, query
    name, category = m[1], m[2]
    known = set(member.get(name, ()))
    frontier = list(known)
    while frontier:  # everything the name is, following 'All As are Bs'
        for bigger in subsets.get(frontier.pop(), ()):
            if bigger not in known:
                known.add(bigger)
                frontier.append(bigger)
    if category in known:
        answer = "yes"
    elif any(frozenset((k, category)) in disjoint for k in known):
        answer = "no"
    else:
        answer = "unknown"
    kind = f"{len(premises)} premises, {'no' if disjoint else 'all'}: {answer}"
    return kind, answer


def _logic_oracle(question: str) -> tuple[str, str]:
    if question.startswith(("All ", "No ")):
        return _syllogism(question)
    assert question.endswith("?"), question
    expression = question[:-1]
    kind = "comparison" if re.fullmatch(r"\d+[<>]\d+", expression) else (
        "comparisons" if re.search(r"\d", expression) else "literals"
    )
    return kind, str(_boolean(expression))


_UNITS = {("km", "m"): 1000, ("m", "cm"): 100, ("cm", "mm"): 10, ("kg", "g"): 1000, ("L", "mL"): 1000,
          ("h", "min"): 60, ("min", "s"): 60, ("d", "h"): 24}


def _exact(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, (numerator, denominator)  # every answer is an integer
    return numerator // denominator


def _science_oracle(question: str) -> tuple[str, str]:
    if m := re.fullmatch(r"(\d+) (\w+) in (\w+)\?", question):
        n, source, target = int(m[1]), m[2], m[3]
        if (source, target) in _UNITS:
            return f"convert {source}->{target}", str(n * _UNITS[source, target])
        return f"convert {source}->{target}", str(_exact(n, _UNITS[target, source]))
    if m := re.fullmatch(r"m=(\d+) kg speeds up from (\d+) to (\d+) m/s\. Momentum change in kg\*m/s\?", question):
        return "momentum", str(int(m[1]) * (int(m[3]) - int(m[2])))
    if m := re.fullmatch(r"(\d+) m/s for (\d+) s, then (\d+) m/s for (\d+) s\. Distance in m\?", question):
        v1, t1, v2, t2 = map(int, m.groups())
        return "distance", str(v1 * t1 + v2 * t2)
    m = re.fullmatch(r"(.*)\. ([A-Z][a-z]+(?: energy)?) in [\w/]+\?", question)
    assert m, question
    given = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[1])}
    quantity = m[2]
    formulas = {
        "Force": lambda g: g["m"] * g["a"],
        "Weight": lambda g: g["m"] * g["g"],
        "Speed": lambda g: _exact(g["d"], g["t"]),
        "Density": lambda g: _exact(g["m"], g["V"]),
        "Power": lambda g: g["V"] * g["I"],
        "Work": lambda g: g["F"] * g["d"],
        "Voltage": lambda g: g["I"] * g["R"],
        "Kinetic energy": lambda g: _exact(g["m"] * g["v"] ** 2, 2),
        "Potential energy": lambda g: g["m"] * g["g"] * g["h"],
    }
    if "g" in given:
        assert given["g"] == 10, question
    return quantity, str(formulas[quantity](given))


def _fewest_moves_dp(start: int, goal: int, add: int) -> int | None:
    """Moves only grow the number: a forward DP over start..goal (not a breadth-first search)."""
    best: dict[int, int] = {start: 0}
    for value in range(start, goal + 1):
        if value not in best:
            continue
        for nxt in (value + add, 2 * value):
            if nxt <= goal and best.get(nxt, 10**9) > best[value] + 1:
                best[nxt] = best[value] + 1
    return best.get(goal)


def _planning_oracle(question: str) -> tuple[str, str]:
    if m := re.fullmatch(r"Steps from \((\d+),(\d+)\) to \((\d+),(\d+)\)\?", question):
        x1, y1, x2, y2 = map(int, m.groups())
        return "grid", str(abs(x1 - x2) + abs(y1 - y2))
    if m := re.fullmatch(r"From (\d+) to (\d+) with \+(\d+) or \*2\. Fewest moves\?", question):
        start, goal, add = map(int, m.groups())
        moves = _fewest_moves_dp(start, goal, add)
        assert moves is not None, question  # the question names a reachable goal
        return "moves", str(moves)
    assert question.endswith(". Order?"), question
    rules = [tuple(r.split(" before ")) for r in question[: -len(". Order?")].split(", ")]
    tasks = sorted({t for rule in rules for t in rule})
    orders = ["".join(p) for p in itertools.permutations(tasks) if all(p.index(a) < p.index(b) for a, b in rules)]
    assert len(orders) == 1, (question, orders)  # the rules fix one order
    return f"order of {len(tasks)}", orders[0]


def _next_numbers(seq: list[int]) -> dict[str, int]:
    """The next term under every rule that fits all the shown terms."""
    diffs = [b - a for a, b in zip(seq, seq[1:])]
    second = [b - a for a, b in zip(diffs, diffs[1:])]
    fits: dict[str, int] = {}
    if len(set(diffs)) == 1:
        fits["arithmetic"] = seq[-1] + diffs[0]
    if seq[0] and seq[1] % seq[0] == 0 and all(b == a * (seq[1] // seq[0]) for a, b in zip(seq, seq[1:])):
        fits["geometric"] = seq[-1] * (seq[1] // seq[0])
    if all(seq[i] == seq[i - 1] + seq[i - 2] for i in range(2, len(seq))):
        fits["fibonacci"] = seq[-1] + seq[-2]
    if len(second) >= 2 and len(set(second)) == 1 and second[0] != 0:
        fits["quadratic"] = seq[-1] + diffs[-1] + second[0]
    if len(diffs) >= 3 and diffs[0] != diffs[1] and all(diffs[i] == diffs[i - 2] for i in range(2, len(diffs))):
        fits["alternating"] = seq[-1] + diffs[-2]
    return fits


def _next_letters(seq: list[str]) -> dict[str, str]:
    fits: dict[str, str] = {}
    for period in range(1, len(seq)):
        if all(seq[i] == seq[i - period] for i in range(period, len(seq))):
            fits[f"period {period}"] = seq[len(seq) - period]
            break
    steps = {ord(b) - ord(a) for a, b in zip(seq, seq[1:])}
    if len(steps) == 1 and 0 not in steps:
        fits["letter steps"] = chr(ord(seq[-1]) + steps.pop())
        assert "A" <= fits["letter steps"] <= "Z", seq
    return fits


def _patterns_oracle(question: str) -> tuple[str, str]:
    assert question.endswith(",?"), question
    terms = question[:-2].split(",")
    if all(re.fullmatch(r"-?\d+", t) for t in terms):
        fits = _next_numbers([int(t) for t in terms])
        if "arithmetic" in fits:
            fits = {("rising" if int(terms[1]) > int(terms[0]) else "falling"): fits["arithmetic"]}
    else:
        assert all(re.fullmatch(r"[A-Z]", t) for t in terms), question
        fits = _next_letters(terms)
    assert len(set(fits.values())) == 1, (question, fits)  # exactly one answer fits the shown terms
    return "+".join(sorted(fits)), str(next(iter(fits.values())))


ORACLES = {
    "math": _math_oracle, "code": _code_oracle, "logic": _logic_oracle,
    "science": _science_oracle, "planning": _planning_oracle, "patterns": _patterns_oracle,
}

# Every kind of question each (domain, difficulty) must produce, as the oracles name them.
EXPECTED_KINDS = {
    ("math", 1): {"n+n", "n-n"},
    ("math", 2): {"n+n", "n-n", "n*n"},
    ("math", 3): {"(n+n)*n", "n*n-n", "n+n-n"},
    ("code", 1): {"1 statements"},
    ("code", 2): {"2 statements"},
    ("code", 3): {"for", "if"},
    ("logic", 1): {"comparison"},
    ("logic", 2): {"literals", "comparisons"},
    ("logic", 3): {"2 premises, all: yes", "2 premises, no: no", "2 premises, all: unknown", "3 premises, all: yes"},
    ("science", 1): {f"convert {a}->{b}" for a, b in _UNITS} | {f"convert {b}->{a}" for a, b in _UNITS},
    ("science", 2): {"Force", "Weight", "Speed", "Density", "Power", "Work", "Voltage"},
    ("science", 3): {"Kinetic energy", "Potential energy", "momentum", "distance"},
    ("planning", 1): {"grid"},
    ("planning", 2): {"order of 3"},
    ("planning", 3): {"order of 4", "moves"},
    ("patterns", 1): {"rising", "period 2"},
    ("patterns", 2): {"rising", "falling", "letter steps", "period 3"},
    ("patterns", 3): {"geometric", "fibonacci", "quadratic", "alternating"},
}


def test_oracles_cover_every_domain():
    assert set(ORACLES) == set(DOMAINS)
    assert {d for d, _ in EXPECTED_KINDS} == set(DOMAINS) and {k for _, k in EXPECTED_KINDS} == {1, 2, 3}


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("domain", DOMAINS)
def test_every_answer_matches_an_independent_oracle(domain, level):
    kinds = set()
    for seed in (0, 7):
        for example in generate(domain, 200, seed=seed, difficulty=level):
            kind, answer = ORACLES[domain](_question(example))
            assert example["answer"] == answer, (domain, level, example["prompt"], answer)
            kinds.add(kind)
    assert kinds == EXPECTED_KINDS[domain, level]


def test_the_built_corpus_agrees_with_the_oracles():
    train, evals = build_corpus(examples_per_domain=90, eval_per_domain=12, seed=3)
    for example in train + evals:
        kind, answer = ORACLES[example["domain"]](_question(example))
        assert example["answer"] == answer, example
        assert kind in EXPECTED_KINDS[example["domain"], example["difficulty"]], (kind, example)


def test_oracles_catch_wrong_answers_on_hand_written_questions():
    assert _math_oracle("(3+4)*5=?") == ("(n+n)*n", "35") and _math_oracle("2*6-13=?")[1] == "-1"
    assert _logic_oracle("not True and False or 3<4?") == ("comparisons", "True")
    assert _logic_oracle("False or (not False and False)?") == ("literals", "False")
    assert _syllogism("All wugs are daxs. Ann is a dax. Is Ann a wug?")[1] == "unknown"
    assert _syllogism("All wugs are daxs. All daxs are feps. Bob is a wug. Is Bob a fep?")[1] == "yes"
    assert _syllogism("No wugs are daxs. Cat is a wug. Is Cat a dax?")[1] == "no"
    assert _science_oracle("3600 s in min?") == ("convert s->min", "60")
    assert _science_oracle("m=3 kg, v=4 m/s. Kinetic energy in J?") == ("Kinetic energy", "24")
    assert _planning_oracle("B before C, A before B. Order?") == ("order of 3", "ABC")
    assert _planning_oracle("From 3 to 12 with +3 or *2. Fewest moves?") == ("moves", "2")
    assert _fewest_moves_dp(1, 8, 1) == 3 and _fewest_moves_dp(3, 7, 3) is None
    assert _patterns_oracle("1,4,9,16,?") == ("quadratic", "25")
    assert _patterns_oracle("3,5,4,6,5,?") == ("alternating", "7")
    assert _patterns_oracle("A,C,E,G,?") == ("letter steps", "I")
