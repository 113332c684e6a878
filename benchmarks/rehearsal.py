"""The longer rehearsal of the headline run on CPU: ``recipes/rehearsal/max_cpu.toml`` wider, deeper
and longer than CI runs it, with inductor (CI: aot_eager), under each launcher and ZeRO stage, and a
run killed in Phase 1 and after the boundary that must resume to the uninterrupted result.

    python benchmarks/rehearsal.py                      # 4 layers x 128 wide, 12 + 12 steps
    python benchmarks/rehearsal.py --layers 2 --hidden 64 --steps 6 --backend aot_eager

Prints each launch's wall time and exit status, and whether the resumed run matches; exits 1 if any
launch failed or the resume differs. Run it on an idle machine (it sets OMP_NUM_THREADS=1 per process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "rehearsal" / "max_cpu.toml"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, processes: int, sets: list[str], resume: bool) -> list[str]:
    tail = [str(BIN / "srde"), "run", str(RECIPE), *[a for s in sets for a in ("--set", s)], *(["--resume"] if resume else [])]
    port = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if launcher == "srde":
        return tail
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), *port, *tail]
    return [str(BIN / "deepspeed"), "--num_gpus", str(processes), *port, *tail]


def launch(workdir: Path, launcher: str, processes: int, sets: list[str], env: dict, resume: bool = False,
           kill_at: str | None = None) -> tuple[int | str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / f"{launcher}{processes}{'-resume' if resume else ''}.log").open("a")
    started = time.perf_counter()
    process = subprocess.Popen(command(launcher, processes, sets, resume), cwd=workdir, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    if kill_at is not None:
        target = workdir / "runs" / "max-rehearsal" / "checkpoints" / kill_at
        while not target.is_dir() and process.poll() is None:
            time.sleep(0.01)
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
            return "killed", time.perf_counter() - started
    code = process.wait()
    return code, time.perf_counter() - started


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def metrics(workdir: Path) -> list[dict]:
    lines = (workdir / "runs" / "max-rehearsal" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="srde-rehearsal-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
           "TORCHINDUCTOR_CACHE_DIR": str(REPO / ".cache" / "inductor")}
    half = max(1, args.steps // 2)
    sets = [f"cache_dir={json.dumps(str(root / 'cache'))}", f"plugins.compile.backend={json.dumps(args.backend)}",
            f"model.config.text_config.num_hidden_layers={args.layers}",
            f"model.config.text_config.hidden_size={args.hidden}",
            f"model.config.text_config.intermediate_size={2 * args.hidden}",
            f"model.config.text_config.head_dim={args.hidden // 2}",
            f"phases.pretrain.steps={args.steps}", f"phases.experts.steps={args.steps}",
            f"phases.pretrain.checkpoint_every={half}", f"phases.experts.checkpoint_every={half}"]
    zero = 'engine.one_process="zero"'
    print(f"rehearsal of recipes/max.toml: {args.layers} layers x {args.hidden}, {args.steps} + {args.steps} steps, "
          f"compile backend {args.backend}, 1 thread per process, in {root}")
    failed = False
    for label, launcher, processes, extra in [
        ("srde, one process (as engine torch)", "srde", 1, []),
        ("srde, ZeRO-2 in one process", "srde", 1, [zero]),
        ("torchrun 1, ZeRO-3", "torchrun", 1, [zero, "engine.zero_stage=3"]),
        ("deepspeed 2, ZeRO-2", "deepspeed", 2, []),
        ("torchrun 2, ZeRO-3", "torchrun", 2, ["engine.zero_stage=3"]),
    ]:
        code, seconds = launch(root / label.replace(" ", "_").replace(",", ""), launcher, processes, sets + extra, env)
        failed |= code != 0
        print(f"  {label:40s} exit {code}  {seconds:7.1f} s")
    whole = root / "torchrun_2_ZeRO-3"
    killed = root / "killed"
    stage3 = sets + ["engine.zero_stage=3"]
    for step, (resume, kill_at) in enumerate([(False, f"pretrain-step{half:07d}"), (True, f"experts-step{half:07d}"),
                                              (True, None)]):
        code, seconds = launch(killed, "torchrun", 2, stage3, env, resume=resume, kill_at=kill_at)
        print(f"  {'killed/resumed run, part ' + str(step + 1):40s} exit {code}  {seconds:7.1f} s")
        failed |= code not in (0, "killed")
    same = not failed and metrics(killed) == metrics(whole)
    print(f"  resumed run ends where the uninterrupted one does: {'yes' if same else 'NO'}")
    return 0 if same and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
