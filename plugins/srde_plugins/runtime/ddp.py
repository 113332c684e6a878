"""The ``ddp`` engine (registered by :mod:`srde_plugins.runtime`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from srde_core.errors import SRDEError
from srde_core.train.engine import Engine, EngineSession, OptimizerSpec, TorchSession


class DDPSession(TorchSession):
    """A torch session whose forward module is wrapped in DistributedDataParallel."""

    def __init__(self, target, spec: OptimizerSpec, device: torch.device, params):
        self.ddp_params = params
        super().__init__(target, spec, device)

    def wrap(self, module: nn.Module) -> nn.Module:
        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.ddp_params.find_unused_parameters,
            bucket_cap_mb=self.ddp_params.bucket_cap_mb,
            broadcast_buffers=False,
        )

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        # Gradients are all-reduced once per optimiser step, in the last micro-batch's backward.
        return contextlib.nullcontext() if last else self.forward.no_sync()


class DDPEngine(Engine):
    """Data parallel over the processes of the launcher (``torchrun``)."""

    def __init__(self, params):
        self.params = params

    def setup(self, run) -> torch.device:
        if not run.dist.distributed:
            run.log("engine ddp: one process (launch with torchrun --nproc_per_node N for data parallelism)")
        try:
            return super().setup(run)
        except (RuntimeError, ValueError) as err:
            raise SRDEError(f"cannot join the process group: {err}", key="engine") from None

    def start(self, target, spec: OptimizerSpec, run) -> EngineSession:
        if not run.dist.distributed:
            return TorchSession(target, spec, run.device)
        return DDPSession(target, spec, run.device, self.params)
