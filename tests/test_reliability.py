"""The reliability catalogue: no silent corruption, no tracebacks for user mistakes, one run per directory.

Each case asserts what the bad-recipe catalogue asserts (the exit status, exactly one stderr line
starting ``srde: error:``, no traceback, nothing left half-written), or the exact resume/fallback
behaviour. One small run of the micro model on a user data set (files relative to the recipe, a
copied tokenizer file) serves the module; cases that damage it put it back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file

from srde_core.cli import main
from srde_core.errors import SRDEError
from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params
from srde_core.run import RunLock

from conftest import REPO

MODEL = """
[model]
architecture = "Ministral3ForCausalLM"

[model.config]
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 32
tie_word_embeddings = true
"""

RECIPE = f"""
name = "rel"
seed = 0
{MODEL}
[tokenizer]
file = "tok.model.v3"

[data]
train_files = ["data/train.jsonl"]
eval_files = ["data/eval.jsonl"]
seq_len = 32

[srde]
layout = {{ name = "uniform", num_experts = 2, top_k = 1 }}
delta = {{ name = "sparse", density = 0.05 }}

[[phases]]
name = "base"
trainer = "base_pretrain"
steps = 2
batch_size = 4
lr = 3e-3
log_every = 1

[[phases]]
name = "experts"
trainer = "joint"
steps = 2
batch_size = 4
lr = 1e-2
losses = ["lm", {{ name = "load_balance", weight = 0.01 }}]
checkpoint_every = 1
keep_checkpoints = 2
log_every = 1

[eval]
max_examples_per_domain = 2
max_new_tokens = 2
batch_size = 4
"""


# -- a plugin for the cases: a loss that turns NaN, a trainer whose factory fails, a failing hook --


class NanParams(Params):
    step: int = Field(1, ge=0, description="0-based optimiser step whose loss (and gradient) is NaN")


def nan_at(params: NanParams):
    def loss(inputs):
        return inputs.hidden.float().mean() * (float("nan") if inputs.step == params.step else 0.0)

    return loss


def explode(params):
    raise ValueError("no accelerator here")


class Probe:
    """Registers ``nan_at`` and ``explode``; fails in ``srde_after_step`` for a run named 'boom';
    records, at each phase start, whether the run directory's lock was held by the run."""

    def __init__(self):
        self.lock_held: list[bool] = []

    @hookimpl
    def srde_register(self, registry):
        registry.add("loss", "nan_at", nan_at, NanParams, "NaN at one step.")
        registry.add("trainer", "explode", explode, NoParams, "A trainer whose factory fails.")

    @hookimpl
    def srde_before_phase(self, phase, run):
        try:
            probe = RunLock(run.run_dir)
            probe.acquire()
        except SRDEError:
            self.lock_held.append(True)
        else:
            probe.release()
            self.lock_held.append(False)

    @hookimpl
    def srde_after_step(self, phase, run, step, metrics):
        if run.recipe.name == "boom" and step == 1:
            raise RuntimeError("kaboom")


@pytest.fixture(scope="module", autouse=True)
def probe():
    """Every command of the module sees the built-in plugins and the probe."""
    from srde_core import plugins as plugins_module

    found = Probe()
    loaded = plugins_module.load_plugins(extra=[("reliability-probe", found)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plugins_module, "load_plugins", lambda **kwargs: loaded)
        yield found


# -- the module's run ------------------------------------------------------------------------------


def rows(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        if i % 2:
            out.append({"prompt": f"Q: what is {i} plus {i + 3}?\nA:", "answer": str(2 * i + 3), "domain": "math"})
        else:
            out.append({"prompt": f"Q: spell {i * 7} backwards\nA:", "answer": str(i * 7)[::-1], "domain": "words"})
    return out


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from srde_plugins.data.tokenizers import mistral_common_data_dir

    directory = tmp_path_factory.mktemp("reliability")
    write_jsonl(directory / "data" / "train.jsonl", rows(24))
    write_jsonl(directory / "data" / "eval.jsonl", rows(6, offset=100))
    shutil.copy(mistral_common_data_dir() / "mistral_instruct_tokenizer_240323.model.v3", directory / "tok.model.v3")
    (directory / "rel.toml").write_text(RECIPE)
    return directory


@pytest.fixture
def cwd(workdir, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    return workdir


@pytest.fixture(scope="module")
def finished(workdir) -> Path:
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        assert main(["run", "rel.toml"]) == 0
    finally:
        os.chdir(previous)
    return workdir / "runs" / "rel"


def srde(*args: str) -> int:
    return main(list(args))


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, captured.err
    assert err[0].startswith("srde: error: ")
    assert "Traceback" not in captured.err + captured.out
    return err[0]


def strict_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, each line parsed as strict JSON (NaN or Infinity fail)."""
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}")

    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def steps(run_dir: Path, phase: str) -> list[int]:
    return [r["step"] for r in strict_records(run_dir) if r.get("phase") == phase]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter.safetensors")


def base_cache(workdir: Path) -> set[str]:
    root = workdir / ".cache" / "srde" / "base"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


class Kept:
    """Files of the run put back after a case damages them."""

    def __init__(self, *paths: Path):
        self.saved = {p: p.read_bytes() for p in paths}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for path, data in self.saved.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def test_the_run_records_its_inputs_and_leaves_no_lock(finished, probe):
    saved = json.loads((finished / "recipe.json").read_text())
    assert len(saved["data_fingerprint"]) == 32 and saved["tokenizer_fingerprint"].startswith("mistral-common:")
    assert json.loads((finished / "base.json").read_text())["adapter"] is True
    assert steps(finished, "base") == [1, 2] and steps(finished, "experts") == [1, 2]
    assert probe.lock_held and all(probe.lock_held)  # held by the run at every phase start
    assert not (finished.parent / ".rel.lock").exists()


# -- 1. resume after the data or the tokenizer changed ---------------------------------------------


def test_resume_after_the_data_changed_is_refused_and_never_caches_a_base(finished, cwd, capsys):
    train, tokenizer = cwd / "data" / "train.jsonl", cwd / "tok.model.v3"
    # As if killed after the base phase's last checkpoint, before its base was cached.
    (key,) = base_cache(cwd)
    cached = cwd / ".cache" / "srde" / "base" / key
    original = train.read_bytes()
    with Kept(train, tokenizer, finished / "adapter.safetensors", finished / "base.json", cached / "model.safetensors"):
        shutil.rmtree(cached)
        (finished / "base.json").unlink()
        with train.open("a") as f:
            f.write(json.dumps(rows(1, offset=500)[0]) + "\n")
        assert srde("run", "rel.toml", "--resume") == 1
        line = one_error_line(capsys)
        assert "runs/rel: the data changed since the run started" in line
        assert "resuming would go on training on other data" in line
        assert base_cache(cwd) == set()  # nothing trained on the old data went under the new data's key

        from srde_plugins.data.tokenizers import mistral_common_data_dir

        train.write_bytes(original)
        tokenizer.write_bytes((mistral_common_data_dir() / "mistral_instruct_tokenizer_240216.model.v2").read_bytes())
        assert srde("run", "rel.toml", "--resume") == 1
        assert "the tokenizer changed since the run started" in one_error_line(capsys)
    # The same inputs again: the base phase finishes from its checkpoint and is cached under its key.
    shutil.rmtree(cached)
    assert srde("run", "rel.toml", "--resume") == 0
    assert base_cache(cwd) == {key}


# -- 2. no labelled token, NaN policy, truncation warning ------------------------------------------


def test_data_without_any_labelled_token_is_refused_at_load(workdir, cwd, capsys):
    code = srde("run", "rel.toml", "--set", "name=nolabel", "--set", 'data.loss_on="answer"', "--set", "data.seq_len=8")
    line = one_error_line(capsys)
    assert code == 2
    assert "rel.toml: data.seq_len: no training example has a labelled token" in line
    assert "cuts every answer away" in line
    assert not (cwd / "runs" / "nolabel").exists()


def test_truncation_warning_and_a_batch_larger_than_the_data(workdir, cwd, capsys):
    code = srde("run", "rel.toml", "--set", "name=big", "--set", "data.seq_len=8", "--set", "phases.experts.batch_size=64")
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, captured.err
    assert err[0] == ("srde: error: rel.toml: phases[1].batch_size: batch size 64 is larger than the training set "
                      "(24 examples)")
    out = " ".join(captured.out.split())  # the console wraps long lines
    assert out.count("warning: ") == 1
    assert "warning: 24 of 24 training examples (100%) lose answer tokens to truncation at data.seq_len = 8" in out
    assert "attention:" not in captured.out  # refused before the model loaded
    assert not (cwd / "runs" / "big").exists()


def test_a_nan_loss_stops_the_run_and_writes_nothing_from_it(finished, cwd, capsys):
    before = base_cache(cwd)
    code = srde("run", "rel.toml", "--set", "name=nan-stop", "--set", "phases.base.steps=3",
                "--set", 'phases.base.losses=["lm", { name = "nan_at", step = 1 }]')
    line = one_error_line(capsys)
    assert code == 1
    assert line == ("srde: error: runs/nan-stop: phase 'base', step 2: non-finite loss (nan); stopped, nothing of "
                    'this step was saved; phases[0].on_nonfinite = "skip" skips such steps instead')
    run_dir = cwd / "runs" / "nan-stop"
    assert steps(run_dir, "base") == [1]  # strict JSON, and no record of the NaN step
    assert not (run_dir / "adapter.safetensors").exists() and not (run_dir / "base.json").exists()
    assert base_cache(cwd) == before  # no broken base cached
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_micro_batch_without_a_labelled_token_adds_nothing(plugins, micro_recipe):
    """Its token means are 0/0: they count as 0 (their weight in the step is 0), not as a NaN step."""
    import types

    from transformers import Ministral3Config, Ministral3ForCausalLM

    from srde_core.dist import SINGLE
    from srde_core.model.build import attach_recipe_experts
    from srde_core.recipe import load_recipe
    from srde_core.train.engine import BackboneForward
    from srde_core.train.objective import Objective

    recipe = load_recipe(micro_recipe, plugins)
    config = Ministral3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, vocab_size=64, tie_word_embeddings=True)
    model = Ministral3ForCausalLM(config)
    experts = attach_recipe_experts(model, recipe)
    run = types.SimpleNamespace(data=types.SimpleNamespace(domains=["a", "b"]), hook=plugins.hook, dist=SINGLE)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    session = types.SimpleNamespace(forward=BackboneForward(model))
    loss, parts = Objective(run, recipe.phases[1], model, experts)(batch, 0, session)
    loss.backward()
    assert parts["lm"] == 0.0 and math.isfinite(parts["load_balance"]) and math.isfinite(float(loss.detach()))
    grads = [p.grad for p in experts.trainable_parameters().values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_the_nonfinite_policy_is_a_checked_phase_key(workdir, capsys):
    assert srde("validate", str(workdir / "rel.toml"), "--set", 'phases.experts.on_nonfinite="ignore"') == 2
    line = one_error_line(capsys)
    assert "phases[1].on_nonfinite: input should be 'stop' or 'skip'" in line


def test_the_difficulty_loss_without_a_dynamic_delta_is_refused_at_validate(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loss = 'phases.experts.losses=["lm", { name = "difficulty", weight = 0.1 }]'
    for command in ("validate", "run"):
        assert srde(command, str(workdir / "rel.toml"), "--set", loss) == 2
        line = one_error_line(capsys)
        assert line == (f"srde: error: {workdir / 'rel.toml'}: phases[1].losses: loss 'difficulty' trains the "
                        "difficulty heads of a dynamic_sparse delta, but srde.delta is 'sparse' (it would log 0.0 "
                        'every step); use srde.delta = { name = "dynamic_sparse", ... } or drop the loss')
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    dynamic = 'srde.delta={ name = "dynamic_sparse", min_density = 0.02, max_density = 0.05 }'
    assert srde("validate", str(workdir / "rel.toml"), "--set", loss, "--set", dynamic) == 0
    capsys.readouterr()


def test_a_vocab_size_below_the_tokenizers_is_refused_at_validate(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "run"):
        assert srde(command, str(workdir / "rel.toml"), "--set", "model.config.vocab_size=1000") == 2
        line = one_error_line(capsys)
        assert line == (f"srde: error: {workdir / 'rel.toml'}: model.config.vocab_size: 1000 is smaller than the "
                        "tokenizer's vocabulary (32768 ids): ids from 1000 on have no embedding; leave it out (the "
                        "tokenizer's size is used) or set it to at least 32768")
    assert list(tmp_path.iterdir()) == []
    assert srde("validate", str(workdir / "rel.toml"), "--set", "model.config.vocab_size=32768") == 0
    capsys.readouterr()


ADAPTIVE = '{{ name = "adaptive", start = {start}, end = {end}, steps = 2, metric = "{metric}" }}'
EXPERT_METRICS = "grad_norm, lm, load_balance, loss, lr, router_entropy, router_max_load, tokens_per_s"


@pytest.mark.parametrize(
    ("sets", "key", "where"),
    [
        (['phases.experts.losses=["lm", {{ name = "load_balance", weight = {schedule} }}]'],
         "phases[1].losses[1].weight.metric", "phase 'experts' does not log"),
        (["plugins.adaptive_sparsity.enabled=true", "plugins.adaptive_sparsity.density={schedule}"],
         "plugins.adaptive_sparsity.density.metric", "no phase of plugins.adaptive_sparsity logs"),
    ],
    ids=["loss-weight", "plugin-settings"],
)
def test_an_adaptive_schedule_following_an_unknown_metric_is_refused_at_validate(workdir, capsys, sets, key, where):
    def validate(metric: str) -> int:
        schedule = ADAPTIVE.format(start=0.05, end=0.02, metric=metric)
        args = [a for s in sets for a in ("--set", s.format(schedule=schedule))]
        return srde("validate", str(workdir / "rel.toml"), *args)

    assert validate("lm_loss") == 2
    line = one_error_line(capsys)
    assert line == (f"srde: error: {workdir / 'rel.toml'}: {key}: adaptive schedule follows metric 'lm_loss', which "
                    f"{where}; the steps log: {EXPERT_METRICS}")
    for metric in ("loss", "load_balance", "router_entropy"):  # what the steps log is accepted
        assert validate(metric) == 0, capsys.readouterr().err
    capsys.readouterr()


def test_on_nonfinite_skip_skips_the_update_and_counts_it(finished, cwd, capsys):
    code = srde("run", "rel.toml", "--set", "name=nan-skip", "--set", "phases.experts.steps=3",
                "--set", 'phases.experts.on_nonfinite="skip"',
                "--set", 'phases.experts.losses=["lm", { name = "nan_at", step = 1 }]')
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "experts: step 2: non-finite loss or gradient; update skipped (1 so far)" in " ".join(captured.out.split())
    records = [r for r in strict_records(cwd / "runs" / "nan-skip") if r["phase"] == "experts"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None and records[1]["skipped"] == 1.0
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert math.isfinite(records[2]["loss"]) and "skipped" not in records[2]
    values = adapter(cwd / "runs" / "nan-skip")
    assert all(torch.isfinite(v).all() for v in values.values())


# -- 3. eval / generate without the adapter --------------------------------------------------------


def test_eval_and_generate_without_the_adapter_end_in_one_line(finished, cwd, capsys):
    eval_json = finished / "eval.json"
    eval_json.write_text('{"sentinel": true}\n')
    with Kept(finished / "adapter.safetensors"):
        (finished / "adapter.safetensors").unlink()
        assert srde("eval", str(finished)) == 1
        line = one_error_line(capsys)
        assert line == (f"srde: error: {finished}: adapter.safetensors is missing, but the run trained experts; "
                        "write it again with srde run rel.toml --resume")
        assert eval_json.read_text() == '{"sentinel": true}\n'  # the base alone was not evaluated over it
        assert srde("generate", str(finished), "--prompt", "Q: what is 1 plus 4?\nA:") == 1
        assert "adapter.safetensors is missing" in one_error_line(capsys)
        assert srde("generate", str(finished), "--prompt", "Q: 1?", "--no-experts", "--max-new-tokens", "2") == 0
        capsys.readouterr()


# -- 4. eval resolves data paths as the run did, and checks the data -------------------------------


def test_eval_from_elsewhere_reads_the_runs_data_and_refuses_changed_data(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative data paths, tokenizer file and cache_dir: the run's, not this directory's
    assert srde("eval", str(finished), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 4 and result["domains"] == ["math", "words"]
    assert list(tmp_path.iterdir()) == []  # nothing cached or written here
    written = (finished / "eval.json").read_text()
    eval_file = finished.parents[1] / "data" / "eval.jsonl"
    with Kept(eval_file):
        write_jsonl(eval_file, rows(6, offset=200))
        assert srde("eval", str(finished)) == 1
        line = one_error_line(capsys)
    assert line.startswith(f"srde: error: {finished}: the data changed since the run started (data fingerprint ")
    assert line.endswith("the eval would measure other data than the run's; restore it or run the recipe again")
    assert (finished / "eval.json").read_text() == written


# -- a damaged tokenised-data cache ---------------------------------------------------------------


def damage_cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damaged", "damage", "command"),
    [
        ("meta.json", damage_cut, "run"),
        ("train/data-00000-of-00001.arrow", damage_cut, "eval"),
        ("eval/state.json", lambda path: path.write_text("garbage"), "eval"),
    ],
    ids=["meta-cut-run", "arrow-cut-eval", "state-garbage-eval"],
)
def test_a_damaged_tokenised_cache_is_tokenised_again(finished, cwd, capsys, damaged, damage, command):
    key = json.loads((finished / "recipe.json").read_text())["data_fingerprint"]
    entry = cwd / ".cache" / "srde" / "tokenized" / key
    damage(entry / damaged)
    args = ("run", "rel.toml", "--set", "name=recached") if command == "run" else ("eval", str(finished))
    assert srde(*args) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not captured.err.strip(), captured.err
    out = "".join(captured.out.split())  # the console wraps (and folds) long lines
    assert "(tokenisedagain:thecache" in out and f"/tokenized/{key}wasdamaged," in out
    assert sorted(p.name for p in entry.parent.iterdir() if key in p.name) == [key]  # nothing of it left aside
    assert srde("eval", str(finished)) == 0  # and the entry written again is read as it is
    out = " ".join(capsys.readouterr().out.split())
    assert "(cached)" in out and "tokenised again" not in out


# -- 5, 11, 12. malformed data files ---------------------------------------------------------------


def data_recipe(directory: Path, fmt: str, file: str) -> Path:
    text = RECIPE.replace('train_files = ["data/train.jsonl"]\neval_files = ["data/eval.jsonl"]',
                          f'format = "{fmt}"\ntrain_files = ["{file}"]')
    path = directory / f"{fmt}.toml"
    path.write_text(text.replace('name = "rel"', f'name = "{fmt}"').replace('file = "tok.model.v3"', ""))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"prompt,answer,domain\nq1,a1,math\nq2,a2\n", "row 2: column 'domain' missing"),
        (b"prompt,answer\nq1,a1\nq2\n", "row 2: column 'answer' missing"),
        (b"prompt,answer\nq1,a1,extra\n", "row 1: 3 fields, but the header has 2"),
        (b"prompt,answer\nq\xff\xfe,a\n", "not UTF-8 text (invalid start byte at byte 15)"),
    ],
    ids=["missing-domain", "missing-answer", "extra-field", "not-utf8"],
)
def test_a_bad_csv_row_ends_in_one_line_naming_the_file_and_row(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_bytes(content)
    assert srde("run", str(data_recipe(tmp_path, "csv", "train.csv"))) == 2
    assert one_error_line(capsys) == f"srde: error: {tmp_path / 'train.csv'}: {message}"
    assert not (tmp_path / "runs").exists()


def test_an_empty_parquet_file_is_exactly_one_line(tmp_path, monkeypatch, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    assert srde("run", str(data_recipe(tmp_path, "parquet", "empty.parquet"))) == 2
    captured = capfd.readouterr()  # the file descriptors: a library's own log line would show here
    assert captured.err == f"srde: error: {tmp_path / 'empty.parquet'}: no rows\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sampler", ["shuffled", "domain_balanced"])
def test_a_list_typed_parquet_column_is_one_line_naming_the_file_and_column(tmp_path, monkeypatch, capsys, sampler):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    items = rows(24)
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in items], "answer": [r["answer"] for r in items],
                             "domain": [[r["domain"]] for r in items]}), tmp_path / "train.parquet")
    recipe = data_recipe(tmp_path, "parquet", "train.parquet")
    assert srde("run", str(recipe), "--set", f'phases.experts.sampler="{sampler}"') == 2
    assert one_error_line(capsys) == (f"srde: error: {tmp_path / 'train.parquet'}: column 'domain' is not a string "
                                      "(list<element: string>)")  # the data's, not a sampler plugin's failure
    assert not (tmp_path / "runs").exists()


def test_a_recipe_with_non_utf8_bytes_is_one_line(tmp_path, capsys):
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert srde("validate", str(tmp_path / "latin1.toml")) == 2
    line = one_error_line(capsys)
    assert line.endswith("latin1.toml: not UTF-8 text (byte 11: invalid continuation byte)")


# -- hub look-ups without the hub ------------------------------------------------------------------


HUB_LOOKUPS = {
    "tokenizer": (['tokenizer={ kind = "hf", name_or_path = "srde-test/no-such-tokenizer" }'],
                  "rel.toml: tokenizer.name_or_path: cannot load 'srde-test/no-such-tokenizer'"),
    "dataset": (['data.format="hf"', 'data.hf_name="srde-test/no-such-dataset"'],
                "srde-test/no-such-dataset: data.hf_train_split: cannot load split 'train'"),
}
NO_HUB = {"offline": ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
          "no-network": ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "127.0.0.1 cannot be reached: Connection refused")}


@pytest.mark.parametrize(("lookup", "hub"), [("tokenizer", "offline"), ("dataset", "no-network")])
def test_a_hub_lookup_offline_or_without_a_network_is_one_line_without_retries(workdir, tmp_path, lookup, hub):
    """HF_HUB_OFFLINE=1, or a hub that takes no connection (HF_ENDPOINT on a closed local port): the
    local HF cache is asked alone, at once; huggingface_hub's retries (five, logged) never start."""
    sets, where = HUB_LOOKUPS[lookup]
    variables, why = NO_HUB[hub]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(variables, HF_HOME=str(tmp_path / "hf"))  # an empty HF cache
    done = subprocess.run([sys.executable, "-m", "srde_core.cli", "run", "rel.toml", "--set", f"name=hub-{lookup}",
                           *[a for s in sets for a in ("--set", s)]], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"srde: error: {where} (not in the local HF cache, and the hub cannot be "
                                        f"used: {why})"], done.stderr  # one line: no retry logged
    assert not (workdir / "runs" / f"hub-{lookup}").exists()


# -- 6. one run per directory ----------------------------------------------------------------------


def test_a_live_run_directory_refuses_resume_and_fresh(finished, cwd, capsys):
    code = ("import sys, time\nfrom pathlib import Path\nfrom srde_core.run import RunLock\n"
            "RunLock(Path(sys.argv[1])).acquire()\nprint('locked', flush=True)\ntime.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flag in ("--resume", "--fresh"):
            assert srde("run", "rel.toml", flag) == 1
            line = one_error_line(capsys)
            assert line == (f"srde: error: runs/rel: another srde process (pid {holder.pid}) is running in this run "
                            "directory; wait for it to end or stop it")
        assert (finished / "adapter.safetensors").is_file()  # --fresh deleted nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock
        holder.wait()
    assert srde("run", "rel.toml", "--resume") == 0  # a dead holder's lock is free
    capsys.readouterr()
    assert not (cwd / "runs" / ".rel.lock").exists()


def test_the_survivor_of_a_killed_peer_ends_in_one_line(finished, cwd):
    """Two processes of one ddp run (as torchrun starts them, without its agent, which would stop the
    survivor itself); the second is SIGKILLed once training runs: the first ends in one line, exit 1,
    its lock released. A peer that hangs instead ends the wait after SRDE_COLLECTIVE_TIMEOUT_S."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "SRDE_COLLECTIVE_TIMEOUT_S": "60"}
    command = [sys.executable, "-m", "srde_core.cli", "run", "rel.toml", "--set", "name=peer-lost",
               "--set", 'engine="ddp"', "--set", "phases.base.steps=100000", "--set", "phases.base.checkpoint_every=0"]
    workers = [subprocess.Popen(command, cwd=cwd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rank in (0, 1)]
    metrics = cwd / "runs" / "peer-lost" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().strip()):  # step 1 took both processes
            assert all(w.poll() is None for w in workers), [w.communicate()[1][-2000:] for w in workers]
            assert time.monotonic() < deadline, "no training step after 240 s"
            time.sleep(0.05)
        workers[1].kill()
        workers[1].wait()
        _, err = workers[0].communicate(timeout=120)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert workers[0].returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("srde: error: runs/peer-lost: process 0 of 2: a collective with the other processes "
                               "failed (")
    assert lines[0].endswith("); another process ended or hangs, its own output says why; the run continues with "
                             "--resume")
    assert not (cwd / "runs" / ".peer-lost.lock").exists()


# -- 7. damaged checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["trainer.pt", "engine.pt", "model.safetensors"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(finished, cwd, capsys, damaged):
    expected = adapter(finished)
    path = finished / "checkpoints" / "experts-step0000002" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert srde("run", "rel.toml", "--resume") == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert out.count(" is damaged ") == 1 and "experts: checkpoint experts-step0000002 is damaged (" in out
    assert "); resuming from experts-step0000001" in out
    assert steps(finished, "experts") == [1, 2]
    for key, value in adapter(finished).items():  # step 2 again, exactly as the first time
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_no_intact_checkpoint_ends_in_one_line(finished, cwd, capsys):
    checkpoints = finished / "checkpoints"
    files = [checkpoints / f"experts-step000000{s}" / "trainer.pt" for s in (1, 2)]
    with Kept(*files):
        for path in files:
            path.write_bytes(b"")
        assert srde("run", "rel.toml", "--resume") == 1
        line = one_error_line(capsys)
    assert line.startswith("srde: error: runs/rel: no intact checkpoint of phase 'experts' (experts-step0000002: ")
    assert line.endswith("; 1 older damaged too); remove them to run the phase again from its start, or start "
                         "over with --fresh")


# -- 8, 9. damaged run files, and metrics across resume --------------------------------------------


FRESH, RESUME = "(start over with --fresh)", "(srde run rel.toml --resume writes it again)"


@pytest.mark.parametrize(
    ("name", "content", "command", "message"),
    [
        ("recipe.json", "", "resume", f"recipe.json: cannot be read (empty); the run directory is damaged {FRESH}"),
        ("recipe.json", '{"fingerprint": "ab', "eval", "recipe.json: cannot be read (not JSON: Unterminated string"),
        ("base.json", "", "eval", f"base.json: cannot be read (empty); the run directory is damaged {RESUME}"),
        ("base.json", "[1, 2]", "eval", f"base.json: is not a JSON object; the run directory is damaged {RESUME}"),
    ],
    ids=["empty-recipe-resume", "cut-recipe-eval", "empty-base-eval", "base-not-an-object"],
)
def test_a_damaged_run_file_is_one_line(finished, cwd, capsys, name, content, command, message):
    with Kept(finished / name):
        (finished / name).write_text(content)
        args = ("run", "rel.toml", "--resume") if command == "resume" else ("eval", str(finished))
        assert srde(*args) == 1
        line = one_error_line(capsys)
    assert message in line, line


def test_resume_repairs_a_partial_last_metrics_line_and_never_duplicates_records(finished, cwd, capsys):
    with (finished / "metrics.jsonl").open("a") as f:
        f.write('{"phase": "experts", "st')  # killed while appending
    # As if killed before the experts phase's first checkpoint.
    for checkpoint in (finished / "checkpoints").glob("experts-*"):
        shutil.rmtree(checkpoint)
    assert srde("run", "rel.toml", "--resume") == 0
    capsys.readouterr()
    assert steps(finished, "base") == [1, 2] and steps(finished, "experts") == [1, 2]  # strict JSON throughout


def test_metrics_are_strict_json_lines_written_whole(tmp_path):
    from srde_core.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"phase": "a", "step": 1}\n{"phase": "a", "st')
    log = MetricsLog(path)  # opening repairs the partial line
    assert path.read_text() == '{"phase": "a", "step": 1}\n'
    log.write({"phase": "a", "step": 2, "loss": float("nan"), "grad_norm": float("inf"), "parts": [float("-inf"), 1.0]})
    assert path.read_text().splitlines()[-1] == '{"grad_norm": null, "loss": null, "parts": [null, 1.0], "phase": "a", "step": 2}'
    assert [r["step"] for r in log.read()] == [1, 2]


# -- 10. unwritable output or cache directories ----------------------------------------------------


def test_an_output_dir_under_a_file_or_a_cache_dir_that_is_a_file(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").write_text("a file")
    recipe = str(workdir / "rel.toml")
    assert srde("run", recipe, "--set", 'output_dir="plain/runs"') == 1
    assert one_error_line(capsys) == (f"srde: error: {workdir / 'rel.toml'}: output_dir: 'plain/runs' is under "
                                      "'plain', which is a file")
    assert srde("run", recipe, "--set", 'cache_dir="plain"') == 1
    assert one_error_line(capsys) == f"srde: error: {workdir / 'rel.toml'}: cache_dir: 'plain' is a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # checked before anything was created


@pytest.mark.parametrize("key", ["cache_dir", "output_dir"])
def test_a_directory_that_takes_no_files_even_for_root_is_one_line(workdir, tmp_path, monkeypatch, capsys, key):
    monkeypatch.chdir(tmp_path)  # /proc passes os.access for root, but no file can be created in it
    assert srde("run", str(workdir / "rel.toml"), "--set", f'{key}="/proc/srde"') == 1
    assert one_error_line(capsys) == (f"srde: error: {workdir / 'rel.toml'}: {key}: '/proc/srde' cannot be created: "
                                      "'/proc' takes no new files (No such file or directory)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: there is nothing to refuse")
def test_a_read_only_output_dir(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o555)
    assert srde("run", str(workdir / "rel.toml"), "--set", 'output_dir="ro/runs"') == 1
    assert one_error_line(capsys).endswith("output_dir: 'ro/runs' cannot be created: 'ro' is not writable")


# -- 13, 14. the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND (see srde --help)"),
        (["evaluate", "x"], "argument COMMAND: invalid choice: 'evaluate'"),
        (["run"], "the following arguments are required: recipe (see srde run --help)"),
        (["generate", "x", "--prompt", "p", "--max-new-tokens", "many"],
         "argument --max-new-tokens: invalid int value: 'many' (see srde generate --help)"),
        (["run", "r.toml", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "r.toml", "--resume", "--fresh"], "--resume and --fresh exclude each other"),
        (["generate", "x", "--prompt", "p", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["eval", "x", "--max-examples", "0"], "--max-examples must be at least 1, got 0"),
        *[(["plan", "r.toml", "--gpu-memory", value], f"--gpu-memory must be a positive number of GiB, got {shown}")
          for value, shown in (("nan", "nan"), ("inf", "inf"), ("0", "0.0"), ("-1", "-1.0"))],
        # refused before the run or any task data is read (no download)
        (["lm-eval", "x", "--tasks", ","], "--tasks names no task"),
        (["lm-eval", "x", "--tasks", "srde_corpus_ll", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["lm-eval", "x", "--tasks", "srde_corpus_ll", "--include-path", "/nonexistent"],
         "--include-path /nonexistent: no such directory"),
    ],
    ids=["no-command", "unknown-command", "missing-recipe", "not-an-int", "unknown-option", "resume-and-fresh",
         "zero-new-tokens", "zero-examples", "gpu-memory-nan", "gpu-memory-inf", "gpu-memory-0", "gpu-memory-negative",
         "lm-eval-no-task", "lm-eval-batch-size-0", "lm-eval-missing-include-path"],
)
def test_command_line_mistakes_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    line = one_error_line(capsys)
    assert message in line, line


def test_api_overrides_that_are_not_a_list_of_assignments_are_refused_naming_them(workdir):
    import srde

    for overrides in ("name=x", {"name": "x"}, ["name=x", 3]):
        with pytest.raises(SRDEError) as refused:
            srde.run(workdir / "rel.toml", overrides)
        assert refused.value.exit_code == 2
        assert refused.value.line().startswith("overrides: expected a list of 'KEY=VALUE' strings (as --set takes)")
    assert not (workdir / "runs" / "x").exists()


def test_help_is_unchanged_and_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: srde [-h] [--version] [--debug] COMMAND ...")
    assert main(["run", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out
    readme = (REPO / "README.md").read_text()
    assert "Exit codes" in readme and "on_nonfinite" in readme and ".NAME.lock" in readme


def test_max_new_tokens_beyond_the_models_context_is_one_line(finished, cwd, capsys):
    assert srde("generate", str(finished), "--prompt", "Q: 1?", "--max-new-tokens", str(10**9)) == 2
    line = one_error_line(capsys)
    assert line.startswith("srde: error: --max-new-tokens 1000000000 and the prompt's ")
    assert "exceed the model's context of " in line


# -- 15, 16. plugins -------------------------------------------------------------------------------


def test_a_plugin_calling_sys_exit_at_import_is_listed_broken_and_others_work(tmp_path, micro_recipe):
    (tmp_path / "demo_exit_plugin.py").write_text("import sys\nsys.exit(3)\n")
    info = tmp_path / "demo_exit_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-exit-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[srde]\ndemo-exit = demo_exit_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "srde_core.cli", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    listed = cli("list-plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["demo-exit"]["error"] == "SystemExit: 3"
    assert plugins["demo-exit"]["distribution"] == "demo-exit-plugin"
    assert plugins["trainers"]["error"] is None
    checked = cli("validate", str(micro_recipe))
    assert checked.returncode == 0 and "ok" in checked.stdout, checked.stderr


def test_a_plugin_hook_that_raises_is_one_line_with_the_traceback_in_error_log(finished, cwd, capsys):
    assert srde("run", "rel.toml", "--set", "name=boom") == 1
    line = one_error_line(capsys)
    log = cwd / "runs" / "boom" / "error.log"
    assert line == (f"srde: error: plugin 'reliability-probe' failed in hook srde_after_step: RuntimeError: kaboom "
                    f"(traceback: {Path('runs/boom/error.log')}; --debug shows it)")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: kaboom" in text
    assert not (cwd / "runs" / ".boom.lock").exists()  # released on the way out
    with pytest.raises(RuntimeError, match="kaboom"):
        srde("--debug", "run", "rel.toml", "--set", "name=boom", "--fresh")
    capsys.readouterr()


def test_a_component_factory_that_raises_fails_before_any_data_loads(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = srde("run", str(workdir / "rel.toml"), "--set", "name=explode", "--set", 'phases.experts.trainer="explode"')
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and len(err) == 1, captured.err
    assert err[0].startswith("srde: error: plugin 'reliability-probe' failed in trainer 'explode': "
                             "ValueError: no accelerator here (traceback: ")
    log = Path(err[0].split("(traceback: ")[1].split(";")[0])
    assert "ValueError: no accelerator here" in log.read_text()
    log.unlink()
    assert "data:" not in captured.out  # before the data loaded
    assert list(tmp_path.iterdir()) == []  # and nothing was written
