"""Engines: `torch` (one process, the default) and `ddp` (DistributedDataParallel under torchrun).

``ddp`` runs several processes under torchrun: gloo on CPU, nccl on GPUs.

    torchrun --nproc_per_node 2 $(which srde) run recipe.toml --set engine=ddp

Each process trains on its share of every global batch (``batch_size`` per process); gradients
are averaged over processes before the optimiser step, so N processes at batch b train like one
process at batch N*b. Only the main process writes the run directory.
"""

from __future__ import annotations

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class DDPParams(Params):
    find_unused_parameters: bool = Field(
        False, description="let DDP skip parameters that get no gradient in a step (slower; needed by some deltas)"
    )
    bucket_cap_mb: int = Field(25, ge=1, description="gradient all-reduce bucket size (MiB)")


@hookimpl
def srde_register(registry):
    registry.add("engine", "torch", "srde_core.train.engine:TorchEngine", NoParams,
                 "One process, plain PyTorch: AdamW, LR schedule, autocast.")
    registry.add("engine", "ddp", "srde_plugins.runtime.ddp:DDPEngine", DDPParams,
                 "Data parallel over the processes of torchrun (DistributedDataParallel; gloo on CPU).")
