"""The training engine: backward, clipping, optimiser and LR-schedule steps, mixed precision.

Trainers never call ``optimizer.step()`` themselves; they go through an engine obtained from the
``srde_training_engine`` hook, so DeepSpeed (or anything else) can replace :class:`TorchEngine`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class Engine(ABC):
    """What a trainer needs from an engine."""

    @abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (mixed precision)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (already divided by the accumulation count)."""

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Clip, step optimiser and LR schedule, zero gradients; return ``{"lr", "grad_norm"}``."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimiser and schedule state for checkpoints."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a phase's ``precision`` on ``device`` (None: full precision).

    ``auto`` means bf16 where the hardware runs it natively (CUDA with bf16 support) and fp32 on
    CPU, where bf16 matmuls are slower than fp32 on most machines.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class TorchEngine(Engine):
    """Plain PyTorch: AdamW over the given parameters, ``LambdaLR`` with the recipe's schedule."""

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        max_grad_norm: float | None,
        schedule: Callable[[int], float],
        device: torch.device,
        precision: str,
    ):
        self.parameters = [p for p in parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError("no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=lr, weight_decay=weight_decay, betas=betas,
            foreach=device.type != "cpu" or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.dtype = autocast_dtype(precision, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        if self.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm))
        else:
            grads = [p.grad.norm() for p in self.parameters if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
