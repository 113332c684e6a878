"""CONTRIBUTING.md's "a plugin of each kind" is working code: its blocks, as one module, register a
component of every kind, a new kind and a hook plugin with settings and state, and a micro run uses
them all."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import run_recipe_in
from srde_core.model.context import ForwardContext
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component
from srde_core.testing import assert_exact

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"
KINDS = {"selector": "every_nth", "delta": "dense", "layout": "last_layers", "router": "token_hash",
         "combine": "half_step", "loss": "hidden_energy", "scheduler": "step_decay", "schedule": "halving",
         "sampler": "in_order", "corpus": "reversal", "source": "pipe", "tokenizer": "bytes",
         "report": "domain_count", "trainer": "banks_only", "engine": "counting", "probe": "trainable_count"}


def section() -> str:
    text = CONTRIBUTING.read_text()
    start = text.index("## Writing a plugin of each kind")
    return text[start:text.index("\n## ", start + 1)]


@pytest.fixture(scope="module")
def example():
    code = "\n\n".join(re.findall(r"```python\n(.*?)```", section(), re.S))
    module = types.ModuleType("contributing_example")
    sys.modules[module.__name__] = module  # pydantic resolves the postponed annotations through it
    exec(compile(code, str(CONTRIBUTING), "exec"), module.__dict__)
    plugins = load_plugins(extra=[("contributing-example", module)])
    assert not plugins.broken, plugins.broken
    yield module, plugins
    del sys.modules[module.__name__]


def test_every_kind_has_a_registered_example(example):
    _, plugins = example
    from srde_core.defaults import CORE_KINDS

    assert set(CORE_KINDS) | {"probe"} == set(KINDS)
    for kind, name in KINDS.items():
        assert plugins.registries[kind].get(name).provider == "contributing-example", kind
    assert "step_counter" in plugins.registries.settings


def test_the_example_delta_router_and_combine_step_are_exact(example):
    _, plugins = example
    build = lambda kind, spec: resolve_component(plugins, kind, spec).build()  # noqa: E731
    assert_exact(build("delta", "dense"), plugins=plugins)
    assert_exact(build("delta", {"name": "sparse", "density": 0.1, "selector": "every_nth"}), plugins=plugins)
    assert_exact(build("combine", "half_step"), plugins=plugins)
    ids = ForwardContext(input_ids=torch.arange(24) * 5)
    mlp = assert_exact(build("router", "token_hash"), context=ids, plugins=plugins)
    assert mlp.router.num_experts == 4


def test_a_run_uses_every_example(example, tmp_path, micro_recipe):
    module, plugins = example
    toml = re.findall(r"```toml\n(.*?)```", section(), re.S)[-1]
    recipe = tmp_path / "each_kind.toml"
    recipe.write_text(f'extends = "{micro_recipe.as_posix()}"\nname = "each_kind"\n'
                      + toml.replace('name = "experts"', 'name = "experts"\nsteps = 4\nbatch_size = 4\nlog_every = 1\ncheckpoint_every = 2'))
    before = module.CountingEngine.sessions
    run_recipe_in(tmp_path, recipe, plugins)
    assert module.CountingEngine.sessions == before + 1
    lines = [json.loads(line) for line in (tmp_path / "runs" / "each_kind" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m.get("phase") == "experts" and "step" in m]
    assert [m["counted"] for m in steps] == [1, 2, 3, 4]  # the hook plugin's state, per its settings
    assert all("hidden_energy" in m and m["hidden_energy_weight"] > 0 for m in steps)
    lrs = [m["lr"] for m in steps]
    assert lrs[2] == pytest.approx(lrs[0] * 0.5)  # step_decay, every = 2


def test_the_example_corpus_writes_its_rows(example, tmp_path):
    from srde_core.data.corpus import find_corpus, write_corpus

    _, plugins = example
    train, evals = write_corpus(tmp_path, 5, 3, 0, find_corpus("reversal", plugins))
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 5 and all(r["answer"] == r["prompt"].split()[2][::-1] for r in rows)
    assert len(evals.read_text().splitlines()) == 3


def test_the_example_format_reads_its_file_and_names_a_bad_line(example, tmp_path):
    from srde_core.data.dataset import load_data
    from srde_core.data.params import DataParams, TokenizerParams
    from srde_core.data.tokenizer import load_tokenizer
    from srde_core.errors import DataError

    _, plugins = example
    (tmp_path / "train.txt").write_text("Q: 2 + 2? | 4\n\nQ: 3 + 3? | 6\n")
    tokenizer = load_tokenizer(TokenizerParams())
    bundle = load_data(DataParams(format="pipe", train_files=["train.txt"]), tokenizer, tmp_path / "cache",
                       base_dir=tmp_path, plugins=plugins)
    assert [r["answer"] for r in bundle.train] == ["4", "6"] and bundle.domains == ["general"]
    (tmp_path / "bad.txt").write_text("Q: 2 + 2? | 4\nQ: 3 + 3?\n")
    with pytest.raises(DataError, match=r"bad.txt: line 2: column 'answer' missing"):
        load_data(DataParams(format="pipe", train_files=["bad.txt"]), tokenizer, tmp_path / "cache",
                  base_dir=tmp_path, plugins=plugins)


def test_the_example_command_is_on_the_command_line(example, tmp_path, capsys):
    from srde_core.cli import build_parser

    _, plugins = example
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    parser = build_parser(plugins)
    args = parser.parse_args(["count-lines", str(tmp_path), "--at-least", "3"])
    assert args.func(args) == 1 and capsys.readouterr().out == "2 metrics lines\n"
    with pytest.raises(SystemExit) as mistake:
        parser.parse_args(["count-lines", str(tmp_path), "--at-least", "many"])
    assert mistake.value.code == 2 and "argument --at-least: invalid int value: 'many'" in capsys.readouterr().err


def test_the_example_tokenizer_kind_round_trips_utf8(example):
    from srde_core.data.params import TokenizerParams
    from srde_core.data.tokenizer import load_tokenizer

    _, plugins = example
    tokenizer = load_tokenizer(TokenizerParams(kind="bytes"), plugins=plugins)
    ids = tokenizer.encode("Q: café?", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len("Q: café?".encode()) + 2
    assert tokenizer.decode(ids) == "Q: café?" and tokenizer.fingerprint == "bytes:1"
