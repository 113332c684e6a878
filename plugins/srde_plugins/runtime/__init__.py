"""Engines: `torch` (one process, the default), `ddp` (DistributedDataParallel under torchrun) and
`deepspeed` (ZeRO stage 2 or 3, the optional extra ``srde[deepspeed]``).

``ddp`` and ``deepspeed`` run several processes under torchrun (or the deepspeed launcher): gloo on
CPU, nccl on GPUs.

    torchrun --nproc_per_node 2 $(which srde) run recipe.toml --set engine=ddp
    deepspeed --num_gpus 8 $(which srde) run recipe.toml     # engine = { name = "deepspeed", zero_stage = 3 }

Each process trains on its share of every global batch (``batch_size`` per process); gradients
are averaged over processes before the optimiser step, so N processes at batch b train like one
process at batch N*b. Only the main process writes the run directory.

``srde plan RECIPE [--gpus N]`` (added here through ``srde_add_commands``) prints the memory per GPU of
a recipe's training as its engine lays it out (:mod:`srde_plugins.runtime.plan`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class DDPParams(Params):
    find_unused_parameters: bool = Field(
        False, description="let DDP skip parameters that get no gradient in a step (slower; needed by some deltas)"
    )
    bucket_cap_mb: int = Field(25, ge=1, description="gradient all-reduce bucket size (MiB)")


class DeepSpeedParams(Params):
    zero_stage: Literal[2, 3] = Field(2, description="ZeRO stage: 2 partitions gradients and optimiser state, 3 the parameters too")
    offload_optimizer: bool = Field(False, description="keep the optimiser state on the CPU (DeepSpeed's CPU Adam, a compiled op)")
    offload_params: bool = Field(False, description="keep the partitioned parameters on the CPU (zero_stage = 3 only)")
    config: str | None = Field(None, description="a DeepSpeed JSON config merged over the generated one (relative to the recipe)")
    one_process: Literal["torch", "zero"] = Field(
        "torch", description="with one process ZeRO shards nothing and only adds an fp32 master copy and buckets: "
        "'torch' trains as engine 'torch' there (unless an offload is asked for), 'zero' keeps ZeRO",
    )


@hookimpl
def srde_add_commands(subparsers):
    from srde_plugins.runtime.commands import add_plan

    add_plan(subparsers)


@hookimpl
def srde_register(registry):
    registry.add("engine", "torch", "srde_core.train.engine:TorchEngine", NoParams,
                 "One process, plain PyTorch: AdamW, LR schedule, autocast.")
    registry.add("engine", "ddp", "srde_plugins.runtime.ddp:DDPEngine", DDPParams,
                 "Data parallel over the processes of torchrun (DistributedDataParallel; gloo on CPU).")
    registry.add("engine", "deepspeed", "srde_plugins.runtime.deepspeed:make_engine", DeepSpeedParams,
                 "DeepSpeed ZeRO stage 2 or 3 over the processes of torchrun or the deepspeed launcher.")
