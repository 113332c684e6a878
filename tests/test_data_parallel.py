"""The `ddp` engine with 2 CPU processes under torchrun (gloo on 127.0.0.1): the same losses as one
process at the same global batch, exact resume after SIGKILL, and an adapter a plain process loads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES

COMMON = [
    "phases.base.log_every=1", "phases.experts.log_every=1", "phases.experts.steps=16",
    "phases.experts.checkpoint_every=2", "phases.experts.keep_checkpoints=20",
]
PER_PROCESS = ["engine=ddp", "phases.base.batch_size=4", "phases.experts.batch_size=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir, overrides, *, processes: int, resume: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "srde_core.cli"]
    args = ["run", str(RECIPES / "micro.toml"), *[a for o in overrides for a in ("--set", o)]]
    if resume:
        args.append("--resume")
    return [*launcher, *args] if processes > 1 else [sys.executable, "-m", "srde_core.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def launch(workdir, overrides, *, processes: int, resume: bool = False) -> None:
    done = subprocess.run(command(workdir, overrides, processes=processes, resume=resume), cwd=workdir, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "runs" / "micro" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, double = tmp_path_factory.mktemp("one-process"), tmp_path_factory.mktemp("two-processes")
    launch(single, COMMON, processes=1)
    launch(double, [*COMMON, *PER_PROCESS], processes=2)
    return single, double


def test_two_processes_give_the_losses_of_one_process_at_the_same_global_batch(runs):
    single, double = runs
    one, two = metrics(single), metrics(double)
    assert [(m["phase"], m["step"]) for m in one] == [(m["phase"], m["step"]) for m in two]
    for a, b in zip(one, two):
        for key in ("loss", "lm", "load_balance", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["phase"], a["step"], key)


def test_only_the_main_process_writes_the_run_directory(runs):
    _, double = runs
    run_dir = double / "runs" / "micro"
    assert len(metrics(double)) == 6 + 16  # one line per logged step, not one per process
    assert sorted(p.name for p in (run_dir / "checkpoints" / "experts-step0000016").iterdir()) == [
        "engine.pt", "model.safetensors", "rng-0.pt", "rng-1.pt", "trainer.pt"]


def test_a_killed_two_process_run_resumes_exactly(runs, tmp_path):
    _, double = runs
    overrides = [*COMMON, *PER_PROCESS]
    process = subprocess.Popen(command(tmp_path, overrides, processes=2), cwd=tmp_path, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = tmp_path / "runs" / "micro" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "experts-step0000002").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first experts checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (checkpoints / "experts-step0000016").exists(), "killed too late to test anything"
    launch(tmp_path, overrides, processes=2, resume=True)
    killed = load_file(tmp_path / "runs" / "micro" / "adapter.safetensors")
    whole = load_file(double / "runs" / "micro" / "adapter.safetensors")
    assert killed.keys() == whole.keys() and all(torch.equal(killed[k], whole[k]) for k in whole)
    assert metrics(tmp_path)[-1]["loss"] == metrics(double)[-1]["loss"]
    assert [m["step"] for m in metrics(tmp_path) if m["phase"] == "experts"] == list(range(1, 17))


def test_the_adapter_of_a_two_process_run_loads_in_one_plain_process(runs):
    import srde

    _, double = runs
    run_dir = double / "runs" / "micro"
    model, _ = srde.load(run_dir)
    saved = load_file(run_dir / "adapter.safetensors")
    loaded = srde.experts_of(model).adapter_state()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k].cpu()) for k in saved)
    assert any(torch.count_nonzero(v) for k, v in saved.items() if k.endswith(".values"))  # it trained
