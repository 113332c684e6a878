"""The ``ddp`` engine with 2 CPU processes under torchrun (gloo on 127.0.0.1).

Three runs of ``tests/recipes/ddp_micro.toml`` (a dense base phase, then an experts phase whose
banks are masked and pruned mid-phase by adaptive sparsity), shared by the tests (``runs``):

* two processes at batch 4 each, under torchrun;
* the same, killed with SIGKILL once an experts checkpoint after the pruning exists, then resumed
  under torchrun;
* one plain process at batch 8, in the test process.

They show that 2 processes train like 1 process at the same global batch (every logged loss of
both phases), that a killed 2-process run resumes exactly, and that the adapter a 2-process run
wrote loads in a plain single process.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES, run_recipe_in
from srde_core.dist import Dist
from srde_testkit import start_torchrun

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="needs torch.distributed and Linux /proc (to kill the workers)")

RECIPE = RECIPES / "ddp_micro.toml"
NAME = "ddp_micro"
BATCH = 8  # the recipe's batch size of both phases: one process's batch, twice each of two processes'
TWO = ["engine=ddp", f"phases.base.batch_size={BATCH // 2}", f"phases.experts.batch_size={BATCH // 2}"]
EXPERTS_STEPS, PRUNED_AT = 12, 4  # as in the recipe (checkpoint_every = 2; banks pruned at step 4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# Numbers that differ between 1 and 2 processes by design: throughput, and router statistics, which
# are per-process (nonlinear in the batch) and averaged over processes for logging.
NOT_EXACT = {"tokens_per_s", "router_max_load", "router_entropy"}


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports of 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def torchrun(workdir: Path, cache: Path, port: int, *, resume: bool = False) -> subprocess.Popen:
    """Start ``srde run`` of the recipe in 2 processes under torchrun, in a session of its own."""
    return start_torchrun(workdir, RECIPE, [*TWO, f"cache_dir={json.dumps(str(cache))}"], port, ENV, resume=resume)


def finish(launcher: subprocess.Popen, workdir: Path, timeout: float = 240) -> None:
    try:
        code = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_everything(launcher)
        code = f"nothing (killed after {timeout} s)"
    if code != 0:
        logs = "\n".join(log.read_text()[-5000:] for log in sorted(workdir.glob("torchrun*.log")))
        pytest.fail(f"torchrun in {workdir} exited {code}:\n{logs}")


def run_dir(workdir: Path) -> Path:
    return workdir / "runs" / NAME


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint(workdir: Path, phase: str, step: int) -> Path:
    return run_dir(workdir) / "checkpoints" / f"{phase}-step{step:07d}"


def stamp(directory: Path) -> tuple[int, int]:
    """Identifies the file a checkpoint directory's trainer.pt is (rewriting it changes both)."""
    stat = (directory / "trainer.pt").stat()
    return stat.st_ino, stat.st_mtime_ns


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def kill_everything(launcher: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group and each worker's: torchrun starts every worker in a session
    of its own, so killing torchrun's group alone would leave the workers training."""
    workers = descendants(launcher.pid)
    for kill, pid in [(os.killpg, launcher.pid)] + [(k, pid) for pid in workers for k in (os.killpg, os.kill)]:
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait(timeout=30)
    deadline = time.time() + 30
    while not all(gone(pid) for pid in workers):
        assert time.time() < deadline, "the workers outlived SIGKILL"
        time.sleep(0.05)


# -- what a process other than the main one writes: nothing of the run directory ------------------


class OtherProcess(Dist):
    """Rank 1 of 2 whose collectives are those of a lone process: the main process is left out."""

    @property
    def distributed(self) -> bool:
        return False


class MetricsRecorder:
    """Stands in for the metrics log: records every line written to it."""

    def __init__(self):
        self.lines: list[dict] = []

    def write(self, record: dict) -> None:
        self.lines.append(record)


def test_a_process_other_than_the_main_one_writes_no_metrics_and_no_trainer_state(tmp_path, plugins):
    """The experts phase of a finished micro run driven again as rank 1 of 2 (in this process, in a
    few seconds): it logs every step, yet writes no metrics line, and its checkpoint holds its RNG
    state only (the main process writes the trainer state, and the run directory)."""
    from srde_core.train.checkpoints import CheckpointStore

    run = run_recipe_in(tmp_path, RECIPES / "micro.toml", plugins,
                        ["phases.base.steps=1", "phases.experts.steps=2", "phases.experts.log_every=1"])
    phase = run.recipe.phases[-1]
    run.dist, run.metrics, run.resume = OtherProcess(rank=1, world_size=2), MetricsRecorder(), False
    run.checkpoints = CheckpointStore(tmp_path / "other" / "checkpoints")
    # the main process's part of the final checkpoint: the directory the processes write into
    shared = run.checkpoints.root / f".tmp-{phase.name}-step{phase.steps:07d}"
    shared.mkdir(parents=True)
    result = phase.trainer.build().run(run, phase)
    assert result and result["step"] == phase.steps  # the phase ran, and logged its steps
    assert run.metrics.lines == [], "a process other than the main one wrote metrics lines"
    assert sorted(p.name for p in shared.iterdir()) == ["rng-1.pt"]


# -- the runs ------------------------------------------------------------------------------------


@dataclass
class Runs:
    whole: Path  # the working directory of the uninterrupted 2-process run
    resumed: Path  # ... of the 2-process run killed after the pruning and resumed
    single: Path  # ... of the 1-process run
    reference: Any  # the 1-process run's finished RunContext (its model and experts in memory)
    left: dict[str, tuple[int, int]]  # checkpoint name -> (inode, mtime) of its trainer.pt after the kill


@pytest.fixture(scope="module")
def runs(tmp_path_factory, plugins) -> Runs:
    """The three runs, overlapped to keep the file short on 2 cores (each process spends most of
    its time importing torch and transformers): the uninterrupted and the doomed 2-process runs
    start together; the doomed one is SIGKILLed as soon as its first checkpoint after the pruning
    exists and resumed at once; the 1-process run goes on in this process meanwhile. The runs share
    one data cache."""
    cache, whole, resumed, single = (tmp_path_factory.mktemp(name) for name in ("cache", "whole", "killed", "single"))
    ports = free_ports(2)
    started = [torchrun(whole, cache, ports[0])]
    try:
        doomed = torchrun(resumed, cache, ports[1])
        started.append(doomed)
        target = checkpoint(resumed, "experts", PRUNED_AT)
        deadline = time.time() + 240
        while not target.is_dir():
            if doomed.poll() is not None:
                finish(doomed, resumed)
                pytest.fail(f"the run ended before checkpoint {target.name}")
            assert time.time() < deadline, f"no checkpoint {target.name} after 240 s"
            time.sleep(0.005)
        kill_everything(doomed)
        # The kill must land inside the experts phase, after the pruning, before the end.
        assert not checkpoint(resumed, "experts", EXPERTS_STEPS).exists(), "killed too late: the phase had finished"
        assert not (run_dir(resumed) / "adapter.safetensors").exists()
        left = {c.name: stamp(c) for c in (run_dir(resumed) / "checkpoints").glob("*-step*")}
        again = torchrun(resumed, cache, free_ports(1)[0], resume=True)
        started.append(again)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for the workers
        try:
            reference = run_recipe_in(single, RECIPE, plugins, [f"cache_dir={json.dumps(str(cache))}"])
        finally:
            torch.set_num_threads(threads)

        finish(started[0], whole)
        finish(again, resumed)
    finally:
        for launcher in started:
            if launcher.poll() is None:
                kill_everything(launcher)
    return Runs(whole, resumed, single, reference, left)


# -- 1. two processes at batch b train like one process at batch 2b -------------------------------


def test_two_processes_log_the_losses_of_one_process_at_the_same_global_batch(runs):
    one, two = metrics(runs.single), metrics(runs.whole)
    assert [(m["phase"], m["step"]) for m in two] == [(m["phase"], m["step"]) for m in one]
    assert [m["step"] for m in one if m["phase"] == "experts"] == list(range(1, EXPERTS_STEPS + 1))
    assert {m["phase"] for m in one} == {"base", "experts"}
    for a, b in zip(one, two):
        assert set(a) == set(b), (a["phase"], a["step"])
        for key in sorted(set(a) - NOT_EXACT - {"phase", "step"}):
            # grad_norm: a norm of a float32 gradient all-reduced in another order; 1e-3 still
            # fails by far when the gradients are not averaged over processes
            rel = 1e-3 if key == "grad_norm" else 1e-4
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-9), (a["phase"], a["step"], key, a[key], b[key])
    experts = [m for m in one if m["phase"] == "experts"]
    # the losses the comparison covers, in both phases; the experts phase pruned its banks
    assert all({"loss", "lm"} <= set(m) for m in one) and all("load_balance" in m for m in experts)
    assert experts[-1]["density_in_use"] < 0.06 < experts[0]["density_in_use"]
    # the losses moved: a step-by-step comparison of constants would prove nothing
    for phase in ("base", "experts"):
        losses = [m["loss"] for m in one if m["phase"] == phase]
        assert max(losses) - min(losses) > 1e-3, phase


def test_only_the_main_process_writes_the_run_directory(runs):
    directory = run_dir(runs.whole)
    assert len(metrics(runs.whole)) == 3 + EXPERTS_STEPS  # one line per step, not one per process
    final = checkpoint(runs.whole, "experts", EXPERTS_STEPS)
    assert sorted(p.name for p in final.iterdir()) == ["engine.pt", "model.safetensors", "rng-0.pt", "rng-1.pt", "trainer.pt"]
    assert not list((directory / "checkpoints").glob(".tmp-*"))


# -- 2. a killed 2-process run resumes exactly --------------------------------------------------


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(runs):
    again, whole = metrics(runs.resumed), metrics(runs.whole)
    assert [(m["phase"], m["step"]) for m in again] == [(m["phase"], m["step"]) for m in whole]
    for a, b in zip(again, whole):
        a, b = ({k: v for k, v in m.items() if k != "tokens_per_s"} for m in (a, b))
        assert a == b, (a["phase"], a["step"])
    assert again[-1]["step"] == EXPERTS_STEPS and again[-1]["loss"] == whole[-1]["loss"]
    killed, uninterrupted = (load_file(run_dir(w) / "adapter.safetensors") for w in (runs.resumed, runs.whole))
    assert killed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(killed[key], uninterrupted[key]), key
    # the resumed run went on from the checkpoints the kill left (the last one after the pruning,
    # so its banks were resized as it loaded): it did not write them again
    assert {"base-step0000003", f"experts-step{PRUNED_AT:07d}"} <= set(runs.left)
    for name, before in runs.left.items():
        assert stamp(run_dir(runs.resumed) / "checkpoints" / name) == before, name


# -- 3. the adapter of a 2-process run loads in one plain process ------------------------------


def test_the_adapter_of_a_two_process_run_loads_in_one_plain_process(runs):
    from rich.console import Console

    from srde_core.run import open_finished_run

    directory = run_dir(runs.whole)
    run = open_finished_run(directory, Console(file=io.StringIO()))
    loaded = run.experts.adapter_state()
    saved = load_file(directory / "adapter.safetensors")
    # the parameters the two processes trained, as the session held them at the last step
    trained = load_file(checkpoint(runs.whole, "experts", EXPERTS_STEPS) / "model.safetensors")
    assert loaded.keys() == saved.keys() == trained.keys()
    for key in saved:
        assert torch.equal(loaded[key].cpu(), saved[key]), key
        assert torch.equal(loaded[key].cpu(), trained[key]), key
    # ... which are what one process at the same global batch trains: the same positions (pruned
    # alike), and values within float noise (Adam's normalised steps amplify the noise of entries
    # with tiny gradients, so the tensors are compared as wholes)
    # (the density schedule ranks entries by magnitude: a near-tie may fall the other way under
    # another reduction order, so a few positions may differ; a bank whose positions agree has
    # the same values within noise)
    single = runs.reference.experts.adapter_state()
    assert single.keys() == saved.keys()
    agree = {}
    for key in saved:
        mine, theirs = saved[key], single[key].cpu()
        if not mine.is_floating_point():
            assert mine.shape == theirs.shape, key
            if key.endswith("positions"):  # per expert, the same set of positions
                rows = zip(mine.reshape(mine.shape[0], -1).tolist(), theirs.reshape(theirs.shape[0], -1).tolist())
                common = sum(len(set(a) & set(b)) for a, b in rows)
            else:
                common = int((mine == theirs).sum())
            assert common >= 0.97 * mine.numel(), (key, common, mine.numel())
            bank = key.rsplit(".", 1)[0]
            agree[bank] = agree.get(bank, True) and torch.equal(mine, theirs)
    assert sum(agree.values()) >= len(agree) // 2, agree  # most banks were pruned exactly alike
    for key in saved:
        mine, theirs = saved[key], single[key].cpu()
        if mine.is_floating_point() and agree.get(key.rsplit(".", 1)[0], True):
            assert mine.shape == theirs.shape, key
            assert float((mine - theirs).norm()) <= 1e-2 * float(theirs.norm()), key
    values = [v for k, v in saved.items() if k.endswith(".values")]
    assert values and all(torch.count_nonzero(v) for v in values)  # the experts trained
    # the banks came back pruned (density 0.2 -> 0.05: the parameters were replaced mid-phase)
    banks = [bank for per_proj in run.experts.banks().values() for bank in per_proj.values()]
    assert banks and all(bank.count == round(0.05 * bank.out_features * bank.in_features) for bank in banks)
    # the dense base the two processes trained came back too, and the whole model computes what
    # the single-process model computes
    base = load_file(directory / "base" / "model.safetensors")
    state = run.model.state_dict()
    for key, weight in base.items():
        key = key if key in state else key.replace(".mlp.", ".mlp.base.")  # the MLPs the experts wrap
        assert torch.equal(state[key].cpu(), weight), key
    ids = torch.tensor([row["input_ids"][:16] for row in run.data.eval.select(range(4))])
    with torch.no_grad():
        mine = run.model(input_ids=ids).logits
        theirs = runs.reference.model.eval()(input_ids=ids).logits
        run.experts.set_enabled(False)
        base_only = run.model(input_ids=ids).logits
        run.experts.set_enabled(True)
    assert math.isfinite(float(mine.abs().max()))
    assert float((mine - base_only).abs().max()) > 1e-2  # the experts change what the model computes
    # as a whole (a few entries may have been pruned the other way, above): far closer to the
    # single-process model than the experts move it from the base
    assert float((mine - theirs).norm()) <= 0.05 * float((mine - base_only).norm())
