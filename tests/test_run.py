"""`srde run` end to end on the micro recipe: run directory, caches, checkpoints, exact resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srde_core.cli import main
from conftest import run_recipe_in


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_recipe_metrics_checkpoints_and_adapter(micro_run):
    saved = json.loads((micro_run / "recipe.json").read_text())
    assert saved["recipe"]["name"] == "micro" and len(saved["fingerprint"]) == 64
    records = metrics(micro_run)
    assert {r["phase"] for r in records} == {"base", "experts"}
    assert records[-1]["phase"] == "experts" and records[-1]["step"] == 6
    assert {"loss", "lm", "load_balance", "lr", "grad_norm", "tokens_per_s"} <= set(records[-1])
    names = sorted(p.name for p in (micro_run / "checkpoints").iterdir())
    # keep_checkpoints = 2 for experts (steps 4 and 6); the final base checkpoint is always kept
    assert names == ["base-step0000006", "experts-step0000004", "experts-step0000006"]
    adapter = load_file(micro_run / "adapter.safetensors")
    assert adapter and all(k.startswith(("routers.", "banks.")) for k in adapter)
    assert json.loads((micro_run / "base.json").read_text())["weights"].endswith("model.safetensors")


def test_experts_train_and_the_base_stays_frozen(micro_run):
    adapter = load_file(micro_run / "adapter.safetensors")
    values = [v for k, v in adapter.items() if k.endswith(".values")]
    assert values and any(v.abs().sum() > 0 for v in values)  # deltas start at zero and moved
    base_ckpt = load_file(micro_run / "checkpoints" / "base-step0000006" / "model.safetensors")
    base_weights = load_file(json.loads((micro_run / "base.json").read_text())["weights"])
    for key, value in base_ckpt.items():
        assert torch.equal(value, base_weights[key]), key


def test_second_run_reuses_the_cached_base_and_tokenised_data(micro_run, plugins, micro_recipe):
    workdir = micro_run.parents[1]
    run = run_recipe_in(workdir, micro_recipe, plugins, ["name=micro-again", "phases.experts.steps=1"])
    log = run.console.file.getvalue()
    assert "base loaded from cache" in log and "(cached)" in log
    assert run.data.cache_hit


def test_existing_run_directory_needs_resume_or_fresh(micro_run, micro_recipe, capsys, monkeypatch):
    monkeypatch.chdir(micro_run.parents[1])
    assert main(["run", str(micro_recipe)]) == 1
    assert "run directory exists; pass --resume to continue it or --fresh to start over" in capsys.readouterr().err


def test_resume_with_a_changed_recipe_is_refused(micro_run, micro_recipe, capsys, monkeypatch):
    monkeypatch.chdir(micro_run.parents[1])
    assert main(["run", str(micro_recipe), "--resume", "--set", "phases.experts.lr=0.5"]) == 1
    assert "differs from the one this run started with" in capsys.readouterr().err


def _final_loss(run_dir: Path) -> float:
    return [r for r in metrics(run_dir) if r["phase"] == "experts"][-1]["loss"]


def test_killed_run_resumes_to_the_same_final_loss(tmp_path, plugins, micro_recipe):
    overrides = ["phases.experts.steps=24", "phases.experts.checkpoint_every=4", "phases.experts.log_every=1"]
    reference = tmp_path / "reference"
    reference.mkdir()
    run_recipe_in(reference, micro_recipe, plugins, overrides)

    killed = tmp_path / "killed"
    killed.mkdir()
    command = [sys.executable, "-m", "srde_core.cli", "run", str(micro_recipe)]
    for override in overrides:
        command += ["--set", override]
    process = subprocess.Popen(command, cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = killed / "runs" / "micro" / "checkpoints" / "experts-step0000004"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run_dir = killed / "runs" / "micro"
    assert not (run_dir / "adapter.safetensors").exists(), "the run finished before it could be killed"

    previous = os.getcwd()
    os.chdir(killed)
    try:
        assert main(["run", str(micro_recipe), "--resume", *sum((["--set", o] for o in overrides), [])]) == 0
    finally:
        os.chdir(previous)
    assert _final_loss(run_dir) == pytest.approx(_final_loss(reference / "runs" / "micro"), rel=1e-6)
    steps = [r["step"] for r in metrics(run_dir) if r["phase"] == "experts"]
    assert steps == list(range(1, 25)), "metrics after the resumed checkpoint are not duplicated"
    resumed = load_file(run_dir / "adapter.safetensors")
    expected = load_file(reference / "runs" / "micro" / "adapter.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)


def test_bad_data_ends_in_one_line_and_leaves_no_run_directory(tmp_path, micro_recipe, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"prompt": "Q: 1+1=? A:", "answer": "2", "domain": "math"}\n{oops\n')
    text = micro_recipe.read_text()
    generate = "[data.generate]\nexamples_per_domain = 40\neval_per_domain = 6\nseed = 0\n"
    assert generate in text
    text = text.replace(generate, "").replace("[data]\n", '[data]\ntrain_files = ["train.jsonl"]\n')
    (tmp_path / "files.toml").write_text(text)
    code = main(["run", str(tmp_path / "files.toml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "train.jsonl: line 2" in err[0]
    assert not (tmp_path / "runs").exists()
