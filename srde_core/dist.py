"""The distributed side of a run: which process this is, and the few collectives the core needs.

``Dist.from_env()`` reads what ``torchrun`` and the ``deepspeed`` launcher set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``). A single process is rank 0 of 1 and every collective is a no-op,
so the core calls them unconditionally. Only the main process (rank 0) writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        def read(name: str, default: int) -> int:
            value = os.environ.get(name)
            try:
                return int(value) if value not in (None, "") else default
            except ValueError:
                from srde_core.errors import SRDEError

                raise SRDEError(f"environment variable {name}={value!r} is not an integer") from None

        world = read("WORLD_SIZE", 1)
        return cls(rank=read("RANK", 0), world_size=world, local_rank=read("LOCAL_RANK", 0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def init(self, device_type: str) -> None:
        """Join the process group (gloo on CPU, nccl on CUDA) when there are several processes."""
        if not self.distributed:
            return
        import torch.distributed as td

        if not td.is_initialized():
            timeout = collective_timeout()
            td.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                  **({"timeout": timeout} if timeout is not None else {}))

    def all_sum(self, tensor):
        """The sum of ``tensor`` over processes (a new tensor on its device, no gradient)."""
        tensor = tensor.detach().clone()
        if self.distributed:
            import torch.distributed as td

            device = tensor.device
            if td.get_backend() == "nccl" and device.type != "cuda":  # nccl reduces CUDA tensors only
                tensor = tensor.to(f"cuda:{self.local_rank}")
            td.all_reduce(tensor, op=td.ReduceOp.SUM)
            tensor = tensor.to(device)
        return tensor

    def mean_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Numeric metrics averaged over processes (what the main process logs)."""
        if not self.distributed:
            return metrics
        import torch

        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        values = self.all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)) / self.world_size
        return {**metrics, **{k: float(v) for k, v in zip(keys, values.tolist())}}

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, value: Any) -> Any:
        """``value`` as the main process has it (any picklable object)."""
        if not self.distributed:
            return value
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


SINGLE = Dist()

def collective_timeout():
    """The process group's timeout (``SRDE_COLLECTIVE_TIMEOUT_S``, seconds; unset: torch's default,
    30 minutes on gloo, 10 on nccl): a process that hangs (stopped, deadlocked) ends the others'
    wait after this long; one that dies ends it at once (its connections close)."""
    import datetime

    value = os.environ.get("SRDE_COLLECTIVE_TIMEOUT_S", "")
    if not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        from srde_core.errors import UsageError

        raise UsageError(f"environment variable SRDE_COLLECTIVE_TIMEOUT_S={value!r} is not a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


#: What the collective backends' errors say when a peer is gone (gloo raises plain RuntimeErrors).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "third_party/gloo",
              "NCCL communicator was aborted", "ProcessGroupNCCL")


def collective_failure(err: BaseException) -> str | None:
    """The one-line reason when ``err`` (or what caused it) is a collective of a distributed run
    that failed because another process died or hung; ``None`` otherwise."""
    import re
    import sys

    td = sys.modules.get("torch.distributed")
    if td is None or not td.is_available() or not td.is_initialized():
        return None
    seen: BaseException | None = err
    while seen is not None:
        text = str(seen).strip()
        if isinstance(seen, getattr(td, "DistError", ())) or any(marker in text for marker in _PEER_LOST):
            first = text.splitlines()[0] if text else type(seen).__name__
            first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's [source/file.cc:NNN] prefix
            return first.split(". ")[0].rstrip(".")  # its first sentence
        seen = seen.__cause__ or seen.__context__
    return None
