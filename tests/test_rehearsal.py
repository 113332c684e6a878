"""The headline run, rehearsed on CPU: ``recipes/rehearsal/max_cpu.toml`` (``recipes/max.toml`` with
only what a CPU needs changed) launched every way the README says, from another working directory.

Phase 1 (forced domain experts, the domain-balanced sampler), the router warm start, the joint
phase, gradient checkpointing, bf16, regional compile (``aot_eager`` here: inductor's C++ build
would take minutes per launch on 2 cores; ``benchmarks/rehearsal.py`` runs inductor) and the
DeepSpeed engine, under:

* plain ``srde run`` with the preset's one-process default (trained as engine ``torch``: ZeRO would
  shard nothing);
* plain ``srde run`` and ``torchrun --nproc_per_node 1``, both ZeRO-2 in one process: the same
  adapter to the bit;
* ``deepspeed --num_gpus 1`` (ZeRO-3) and ``deepspeed --num_gpus 2`` (ZeRO-2);
* ``torchrun --nproc_per_node 2`` (ZeRO-3), uninterrupted, and the same run SIGKILLed inside Phase 1,
  resumed, SIGKILLed again after the Phase 1 -> 2 boundary and resumed: it ends where the
  uninterrupted run does (metrics and adapter equal).

The launches run two at a time, each worker on one thread, to fit CI's 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_ddp import free_ports, kill_everything

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="needs torch.distributed and Linux /proc (to kill the workers)")

RECIPE = REPO / "recipes" / "rehearsal" / "max_cpu.toml"
NAME = "max-rehearsal"
BIN = Path(sys.executable).parent
SRDE = str(BIN / "srde")
STEPS = 4  # each phase's, as in the recipe (checkpoint_every = 2)
PATIENCE = 480  # seconds for one launch: the first DeepSpeed run compiles its CPU op
CI = ["plugins.compile.backend=aot_eager"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")}


def command(launcher: str, processes: int, port: int, overrides: list[str], resume: bool) -> list[str]:
    """The README's launch commands (``$(which srde)``), with a port of the test's own."""
    sets = [a for o in [*CI, *overrides] for a in ("--set", o)]
    tail = [SRDE, "run", str(RECIPE), *sets, *(["--resume"] if resume else [])]
    if launcher == "srde":
        return tail
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                "--master_port", str(port), *tail]
    return [str(BIN / "deepspeed"), "--num_gpus", str(processes), "--master_addr", "127.0.0.1",
            "--master_port", str(port), *tail]


@dataclass
class Launch:
    workdir: Path
    process: subprocess.Popen
    log: Path

    def wait(self) -> str:
        try:
            code = self.process.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            kill_everything(self.process)
            code = f"nothing (killed after {PATIENCE} s)"
        text = self.log.read_text(errors="replace")
        if code != 0:
            pytest.fail(f"{self.log.name} in {self.workdir} exited {code}:\n{text[-6000:]}")
        return text


def start(workdir: Path, launcher: str, processes: int, overrides: list[str] = (), *, resume: bool = False,
          tag: str = "") -> Launch:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{launcher}{processes}{tag}{'-resume' if resume else ''}.log"
    with log.open("w") as out:
        process = subprocess.Popen(command(launcher, processes, free_ports(1)[0], list(overrides), resume),
                                   cwd=workdir, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Launch(workdir, process, log)


def run_dir(workdir: Path) -> Path:
    return workdir / "runs" / NAME


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir(workdir) / "metrics.jsonl").read_text().splitlines()]


def kill_at(launch: Launch, phase: str, step: int) -> None:
    """SIGKILL every process of ``launch`` as soon as its ``phase`` checkpoint at ``step`` exists."""
    target = run_dir(launch.workdir) / "checkpoints" / f"{phase}-step{step:07d}"
    deadline = time.time() + PATIENCE
    while not target.is_dir():
        if launch.process.poll() is not None:
            launch.wait()
            pytest.fail(f"the run ended before {target.name}")
        assert time.time() < deadline, f"no checkpoint {target.name} after {PATIENCE} s"
        time.sleep(0.005)
    kill_everything(launch.process)
    assert not (run_dir(launch.workdir) / "adapter.safetensors").exists(), "killed too late"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every launch, two at a time; returns ``{label: (workdir, output)}``."""
    root = tmp_path_factory.mktemp("rehearsal")
    cache = [f"cache_dir={json.dumps(str(root / 'cache'))}"]
    stage3 = [*cache, "engine.zero_stage=3"]
    zero = [*cache, 'engine.one_process="zero"']  # one process keeps ZeRO (by default it trains as engine torch)
    out: dict[str, tuple[Path, str]] = {}
    # one short launch first, with the preset's one-process default; the data and its tokenisation
    # are then cached before launches share the cache
    warmup = start(root / "warmup", "srde", 1, [*cache, "phases.pretrain.steps=1", "phases.experts.steps=1"])
    out["warmup"] = (warmup.workdir, warmup.wait())

    pairs = [
        (("plain", "srde", 1, zero), ("torchrun1", "torchrun", 1, zero)),
        (("deepspeed1", "deepspeed", 1, [*zero, "engine.zero_stage=3"]), ("deepspeed2", "deepspeed", 2, cache)),
    ]
    for pair in pairs:
        launches = [(label, start(root / label, launcher, n, overrides)) for label, launcher, n, overrides in pair]
        for label, launch in launches:
            out[label] = (launch.workdir, launch.wait())

    whole = start(root / "torchrun2", "torchrun", 2, stage3)
    doomed = start(root / "killed", "torchrun", 2, stage3)
    kill_at(doomed, "pretrain", 2)
    resumed = start(root / "killed", "torchrun", 2, stage3, resume=True, tag="-1")
    kill_at(resumed, "experts", 2)
    final = start(root / "killed", "torchrun", 2, stage3, resume=True, tag="-2")
    out["torchrun2"] = (whole.workdir, whole.wait())
    out["killed"] = (final.workdir, final.wait())
    return out


@pytest.mark.parametrize("label, engine_line", [
    ("plain", "processes 1"), ("torchrun1", "processes 1"), ("deepspeed1", "processes 1"),
    ("deepspeed2", "processes 2"), ("torchrun2", "processes 2"),
])
def test_every_launch_trains_both_phases_and_writes_the_adapter(runs, label, engine_line):
    workdir, output = runs[label]
    assert "engine: deepspeed" in output and engine_line in output
    assert "routers warm-started" in output
    assert "compile: phase 'pretrain'" in output and "flash attention: falling back to sdpa" in output
    steps = [(m["phase"], m["step"]) for m in metrics(workdir)]
    assert steps == [("pretrain", s) for s in range(1, STEPS + 1)] + [("experts", s) for s in range(1, STEPS + 1)]
    adapter = load_file(run_dir(workdir) / "adapter.safetensors")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values() if v.is_floating_point())
    assert (run_dir(workdir) / "eval_loss.json").is_file()


def test_one_process_trains_as_engine_torch_by_default(runs):
    workdir, output = runs["warmup"]
    assert "training as engine 'torch'" in output
    assert (run_dir(workdir) / "adapter.safetensors").is_file()


def test_torchrun_with_one_process_trains_as_plain_srde_run(runs):
    plain = load_file(run_dir(runs["plain"][0]) / "adapter.safetensors")
    one = load_file(run_dir(runs["torchrun1"][0]) / "adapter.safetensors")
    assert plain.keys() == one.keys()
    for key in plain:
        assert torch.equal(plain[key], one[key]), key


def test_killed_in_phase1_and_after_the_boundary_resumes_to_the_uninterrupted_result(runs):
    (whole, _), (again, output) = runs["torchrun2"], runs["killed"]
    strip = lambda m: {k: v for k, v in m.items() if k != "tokens_per_s"}  # noqa: E731
    assert [strip(m) for m in metrics(again)] == [strip(m) for m in metrics(whole)]
    a, b = (load_file(run_dir(w) / "adapter.safetensors") for w in (whole, again))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = sorted(p.name for p in again.glob("torchrun2*.log"))
    assert logs == ["torchrun2-1-resume.log", "torchrun2-2-resume.log", "torchrun2.log"]
    assert "resumed from pretrain-step0000002" in (again / "torchrun2-1-resume.log").read_text()
    assert "resumed from experts-step0000002" in output
