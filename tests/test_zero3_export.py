"""The adapter a ZeRO-3 run writes holds the gathered expert parameters, when they are partitioned.

DeepSpeed keeps every parameter smaller than ``stage3_param_persistence_threshold`` (1e5 elements by
default) whole on every process, which covers every expert parameter of a micro model; so here the
threshold is 0 (through the engine's ``config`` JSON, merged over the generated config) and every
parameter is partitioned over the 2 CPU processes (gloo, ``DS_ACCELERATOR=cpu``). One micro run of
``tests/recipes/deepspeed_micro.toml`` (2 steps, its base built from its config inside
``zero.Init``) shows that:

* the expert parameters really are partitioned when the adapter is exported: a probe plugin in each
  worker (``srde_after_phase``) finds every trainable parameter owned by ZeRO-3, not persistent, empty
  in the module and half of it in the process's partition; each process's fp32 optimiser partition in
  the final checkpoint holds half of the trained elements;
* the adapter written at the end equals, value by value, the parameters gathered from the
  partitions of that checkpoint by DeepSpeed's own tool (an adapter written from the partitions
  without gathering them would hold empty tensors), and it loads in one plain process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import RECIPES
from test_ddp import finish, free_ports

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="needs torch.distributed and Linux /proc (to kill the workers)")

RECIPE = RECIPES / "deepspeed_micro.toml"
NAME = "deepspeed_micro"
STEPS = 2
# The first DeepSpeed run on a machine compiles its CPU communication op (about a minute of CPU).
PATIENCE = 480


def adapter_key(name: str) -> str:
    """A trained parameter's name in DeepSpeed's module -> its key in the adapter file."""
    parts = name.removeprefix("model.model.layers.").split(".")
    layer, rest = parts[0], parts[2:]  # "<i>", "mlp", then "banks.<proj>.<name>" or "router.<name>"
    if rest[0] == "banks":
        return ".".join(["banks", f"layer{layer}", *rest[1:]])
    return ".".join(["routers", layer, *rest[1:]])


# Runs ``srde run`` in each worker with a probe plugin that records, after the phase (just before the
# adapter is exported), how ZeRO-3 holds each trainable parameter on this process.
PROBED_CLI = """
import json, os, sys
from pathlib import Path

import srde_core.plugins
from srde_core.hookspecs import hookimpl


class Probe:
    @hookimpl
    def srde_after_phase(self, phase, run):
        held = {name: {"partitioned": hasattr(p, "ds_id"), "here": p.numel(), "whole": int(getattr(p, "ds_numel", -1)),
                       "partition": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else -1,
                       "persists": bool(getattr(p, "ds_persist", False))}
                for name, p in run.experts.trainable_parameters().items()}
        Path(f"partitions-{run.dist.rank}.json").write_text(json.dumps(held))


load = srde_core.plugins.load_plugins
srde_core.plugins.load_plugins = lambda *a, **k: load(*a, **{**k, "extra": [*k.get("extra", ()), ("zero3-probe", Probe())]})
from srde_core.cli import main

sys.exit(main())
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(working directory, run directory) of a 2-process ZeRO-3 run in which no parameter persists whole."""
    from test_deepspeed import ENV

    workdir = tmp_path_factory.mktemp("zero3-export")
    config = workdir / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    (workdir / "probed_cli.py").write_text(PROBED_CLI)
    overrides = [
        f"cache_dir={json.dumps(str(workdir / 'cache'))}",
        "engine.zero_stage=3",
        f"engine.config={json.dumps(str(config))}",
        f"phases.experts.steps={STEPS}",
        f"phases.experts.checkpoint_every={STEPS}",
        "eval.max_examples_per_domain=1",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_ports(1)[0]), "probed_cli.py", "run", str(RECIPE),
               *(a for override in overrides for a in ("--set", override))]
    with (workdir / "torchrun.log").open("w") as log:
        launcher = subprocess.Popen(command, cwd=workdir, env=dict(ENV), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    finish(launcher, workdir, timeout=PATIENCE)
    return workdir, workdir / "runs" / NAME


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"experts-step{STEPS:07d}"


def test_the_expert_parameters_are_partitioned_over_the_processes(run):
    workdir, run_dir = run
    probed = [json.loads((workdir / f"partitions-{rank}.json").read_text()) for rank in (0, 1)]
    assert probed[0].keys() == probed[1].keys() and probed[0]
    for rank, held in enumerate(probed):
        for name, p in held.items():
            # ZeRO-3 owns it, keeps none of it whole here, and holds this process's half of it
            assert p["partitioned"] and not p["persists"], (rank, name, p)
            assert p["here"] == 0 and p["whole"] > 0 and p["partition"] == -(-p["whole"] // 2), (rank, name, p)
    # the checkpoint's optimiser partitions: each process holds half of the trained elements
    deepspeed = final_checkpoint(run_dir) / "deepspeed"
    trained = sum(p["whole"] for p in probed[0].values())
    for rank in (0, 1):
        optim = torch.load(deepspeed / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)
        held = sum(t.numel() for t in optim["optimizer_state_dict"]["fp32_flat_groups"])
        assert trained / 2 <= held <= trained / 2 + len(probed[0]), (rank, held, trained)


def test_the_adapter_equals_the_gathered_parameters_value_by_value(run):
    _, run_dir = run
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import srde

    saved = load_file(run_dir / "adapter.safetensors")
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(final_checkpoint(run_dir)), tag="deepspeed",
                                                        exclude_frozen_parameters=True)
    # the trained parameters gathered from the partitions, and the buffers (whole on every process)
    trained = {adapter_key(name): value for name, value in gathered.items()}
    assert saved.keys() == trained.keys()
    for key in sorted(saved):
        assert saved[key].numel() > 0 and saved[key].shape == trained[key].shape, key
        assert saved[key].dtype == trained[key].dtype and torch.equal(saved[key], trained[key]), key
    values = [saved[k] for k in saved if k.endswith(".values")]
    assert values and all(torch.count_nonzero(v) for v in values)  # the experts trained: not their zero start
    model, _ = srde.load(run_dir)  # one plain process: no engine, no process group
    loaded = srde.experts_of(model).adapter_state()
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert torch.equal(loaded[key].cpu(), saved[key]), key
