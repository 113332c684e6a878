"""The ``ddp`` engine (registered by :mod:`srde_plugins.runtime`)."""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from srde_core.errors import SRDEError
from srde_core.train.engine import Engine, EngineMemory, EngineSession, OptimizerSpec, TorchSession

if TYPE_CHECKING:
    from srde_core.model.components import Remap


class DDPSession(TorchSession):
    """A torch session whose forward module is wrapped in DistributedDataParallel."""

    def __init__(self, target, spec: OptimizerSpec, device: torch.device, params):
        self.ddp_params = params
        super().__init__(target, spec, device)

    def wrap(self, module: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            # torch >= 2.13 deprecates `broadcast_buffers` for `forward_sync_buffers`, which older
            # releases (torch >= 2.4 is supported) do not know; the behaviour wanted is the same.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
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

    def remap(self, remaps: list[Remap]) -> None:
        super().remap(remaps)
        if any(remap.new is not remap.old for remap in remaps):
            # DDP hooks the parameters it was built with: replaced ones (a bank pruned or resized,
            # on every process at the same step) would never be all-reduced, and the old ones never
            # get a gradient again. Wrap the module anew over the current parameters (a collective).
            module = self.forward.module
            self.forward = None  # the old wrapper's reducer unhooks its parameters when it goes
            self.forward = self.wrap(module)

    def close(self) -> None:
        super().close()
        self.forward = None  # the reducer (its gradient buckets and hooks) goes with the wrapper


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

    def memory(self, gpus: int) -> EngineMemory:
        if gpus == 1:
            return EngineMemory(notes=("ddp with one process trains as engine 'torch'",))
        return EngineMemory(gradient_copies=1, notes=("ddp: its communication buckets hold a second copy of the gradients",))
