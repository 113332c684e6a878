"""Engines: the ``engine`` component kind, and the plain PyTorch engine every other one builds on.

An :class:`Engine` is picked once per run (``engine = "torch"`` / ``"ddp"`` / ``"deepspeed"`` in the
recipe). It sets up the processes and devices, may wrap model construction (ZeRO-3 partitions
parameters as they are created), makes partitioned parameters readable on demand, and for each
training phase starts an :class:`EngineSession` from the phase's :class:`OptimizerSpec`: the
session owns the forward module, backward, clipping, the optimiser and LR schedule, mixed
precision, and the checkpoint I/O of what it trains (a sharded engine saves shards from every
process). Trainers never call ``optimizer.step()`` themselves.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from srde_core.train.entry_ages import BORN, correct_young_entries, mark_born

if TYPE_CHECKING:
    from srde_core.model.components import Remap
    from srde_core.train.driver import TrainingTarget

#: ``run(fn)`` -> ``fn(model)``, with the model ready for forwards (see :meth:`Engine.forward_only`).
ForwardRunner = Callable[[Callable[[nn.Module], Any]], Any]


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimiser and LR schedule of a phase, described once; every engine builds from it.

    AdamW with ``lr``, ``betas``, ``weight_decay``; ``schedule(step)`` multiplies ``lr`` at
    optimiser step ``step`` (0-based); gradients are clipped to ``max_grad_norm`` (None: no
    clipping); ``precision`` is the phase's autocast choice. ``batch_size`` (examples per process
    in one micro-batch) and ``grad_accum`` (micro-batches per optimiser step) describe the step's
    shape, for engines that are configured with it (DeepSpeed).
    """

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    max_grad_norm: float | None
    schedule: Callable[[int], float]
    precision: str = "auto"
    batch_size: int = 1
    grad_accum: int = 1

    @classmethod
    def from_phase(cls, phase: Any, updates_per_step: int = 1) -> OptimizerSpec:
        """The phase's spec; the LR schedule spans ``phase.steps * updates_per_step`` optimiser
        updates (RL trainers make several updates per step)."""
        return cls(
            lr=phase.lr,
            weight_decay=phase.weight_decay,
            betas=(phase.beta1, phase.beta2),
            max_grad_norm=phase.max_grad_norm or None,  # 0 disables clipping
            schedule=phase.scheduler.build(total_steps=phase.steps * updates_per_step),
            precision=phase.precision,
            batch_size=phase.batch_size,
            grad_accum=phase.grad_accum,
        )


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


class BackboneForward(nn.Module):
    """The forward a trainer needs: token ids -> the backbone's final hidden state ``[B, S, H]``.

    The LM head is applied by the losses, only where they need logits. Engines wrap this module
    (DistributedDataParallel, DeepSpeed) so gradients are synchronised.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


@dataclass(frozen=True)
class EngineMemory:
    """How an engine lays a phase's training state out on each GPU (:meth:`Engine.memory`), for
    ``srde plan``: what it shards over the GPUs, what it keeps in CPU memory, what it adds.

    :ivar param_shards: parameters (frozen and trainable) are split this many ways.
    :ivar grad_shards: gradients are split this many ways.
    :ivar optimizer_shards: optimiser state (and the master copy) is split this many ways.
    :ivar params_offloaded: parameters live in CPU memory.
    :ivar optimizer_offloaded: optimiser state (and the master copy) live in CPU memory.
    :ivar master_copy: an fp32 copy of the trainable parameters beside them (ZeRO's flat partitions).
    :ivar gradient_copies: extra copies of the gradients (DDP's communication buckets: 1).
    :ivar bucket_elements: a flat fp32 reduce bucket of at most this many elements (and at most the
        trainable count, but at least ``bucket_floor``).
    :ivar gathered_layers: decoder layers held whole at once while parameters are sharded.
    :ivar notes: what the plan should say about the layout.
    :ivar scheme: the name the plan's rows give the sharding (``"ZeRO-2"``), or "".
    :ivar master_detail: what the plan says of the master copy.
    :ivar bucket_detail: what the plan says of the reduce bucket.
    """

    param_shards: int = 1
    grad_shards: int = 1
    optimizer_shards: int = 1
    params_offloaded: bool = False
    optimizer_offloaded: bool = False
    master_copy: bool = False
    gradient_copies: int = 0
    bucket_elements: int = 0
    bucket_floor: int = 0
    gathered_layers: int = 0
    notes: tuple[str, ...] = ()
    scheme: str = ""
    master_detail: str = ""
    bucket_detail: str = ""


class EngineSession(ABC):
    """One phase's training state in an engine."""

    #: Call as ``session.forward(input_ids=..., attention_mask=...)`` -> hidden states.
    forward: nn.Module

    @abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (mixed precision)."""

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Context around one micro-batch's forward and backward; ``last`` before the optimiser
        step (data-parallel engines synchronise gradients only then)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (already divided by the accumulation count)."""

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Clip, step optimiser and LR schedule, zero gradients; return ``{"lr", "grad_norm"}``."""

    @abstractmethod
    def save(self, directory: Path, *, is_main: bool) -> None:
        """Write what this session trains (module state and optimiser) into ``directory``.

        Called on every process; a replicated engine writes from the main process only, a sharded
        one writes each process's shard.
        """

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (on every process)."""

    def remap(self, remaps: list[Remap]) -> None:
        """Parameters moved (a bank changed its positions): move their optimiser state along."""

    def close(self) -> None:
        """The phase is over: release what the session holds (the optimiser and its state, gradient
        buffers), so that the next phase's session starts on a clean slate."""


class Engine(ABC):
    """The ``engine`` component: picked once per run."""

    def check_recipe(self, recipe: Any) -> None:
        """Refuse (a :class:`~srde_core.errors.RecipeError`, one line naming the key) what this
        engine cannot train of ``recipe``: called by ``srde validate`` and before a run does any work."""

    def setup(self, run: Any) -> torch.device:
        """Join the processes of the run (``run.dist``) and return this process's device."""
        run.dist.init(run.device.type)
        return run.device

    def model_init_context(self) -> contextlib.AbstractContextManager | None:
        """Entered while the base model is constructed (see the ``srde_model_init_context`` hook),
        e.g. to partition parameters as they are created (ZeRO-3). None (the default): parameters
        are created whole, straight on the run's device."""
        return None

    def gather(self, tensors: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        """A context in which ``tensors`` (parameters, possibly partitioned) are readable in full."""
        return contextlib.nullcontext()

    def modifying(self, tensors: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        """A context in which ``tensors`` (parameters, possibly partitioned) are whole and what the
        main process writes into them is what every process keeps (a router's warm start)."""
        return self.gather(tensors)

    @contextlib.contextmanager
    def forward_only(self, model: nn.Module) -> Iterator[ForwardRunner]:
        """A context for forwards without training (a warm start, the eval at the end of a run),
        between phases: yields ``run(fn)``, which returns ``fn(model)`` with ``model`` usable for
        forwards, its partitioned parameters fetched layer by layer where the engine partitions
        them (never the whole model at once). Where forwards are collective (ZeRO-3), every process
        must call ``run`` equally often: :attr:`collective_forwards` says so."""
        yield lambda fn: fn(model)

    #: Whether forwards under :meth:`forward_only` need every process (ZeRO-3 fetches parameters
    #: from all of them); the default engines run them on each process alone.
    collective_forwards: bool = False

    def memory(self, gpus: int) -> EngineMemory:
        """How this engine lays a phase out over ``gpus`` GPUs (``srde plan``): by default a full
        replica of everything on each, nothing added."""
        return EngineMemory()

    @contextlib.contextmanager
    def full_state(self, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """``module``'s complete state dict (gathered where partitioned), for adapter export.
        Entered on every process; the main process writes it."""
        with self.gather(list(module.parameters())):
            yield {name: t.detach() for name, t in module.state_dict().items()}

    @abstractmethod
    def start(self, target: TrainingTarget, spec: OptimizerSpec, run: Any) -> EngineSession:
        """A session that trains ``target.parameters`` of ``target.model`` as ``spec`` says."""


class TorchSession(EngineSession):
    """Plain PyTorch: AdamW over the trainable parameters, ``LambdaLR`` with the spec's schedule."""

    def __init__(self, target: TrainingTarget, spec: OptimizerSpec, device: torch.device):
        self.target = target
        self.parameters = [p for p in target.parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError("no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas,
            foreach=device.type != "cpu" or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, spec.schedule)
        self.optimizer.register_step_post_hook(correct_young_entries)  # entries born by a remap
        self.max_grad_norm = spec.max_grad_norm
        self.device = device
        self.dtype = autocast_dtype(spec.precision, device)
        self.forward = self.wrap(BackboneForward(target.model))

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the trainer calls (data-parallel sessions wrap it)."""
        return module

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

    def save(self, directory: Path, *, is_main: bool) -> None:
        if not is_main:
            return
        from srde_core.train.checkpoints import save_tensors

        save_tensors(self.target.get_state(), directory / "model.safetensors")
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.target.set_state(load_file(directory / "model.safetensors", device=str(self.device)))
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def close(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None
        self.optimizer.state.clear()
        self.optimizer = self.scheduler = None  # type: ignore[assignment]

    @torch.no_grad()
    def remap(self, remaps: list[Remap]) -> None:
        """Moments follow their entries; a new entry starts with zero moments and its own step
        count for Adam's bias correction (:mod:`srde_core.train.entry_ages`)."""
        for remap in remaps:
            state = self.optimizer.state.pop(remap.old, None)
            if remap.new is not remap.old:
                self._replace(remap.old, remap.new)
            if state is None:
                continue
            moved = {}
            for key, value in state.items():
                if torch.is_tensor(value) and (value.shape == remap.old.shape or key == BORN):
                    moved[key] = follow_remap(value, remap.index)
                else:
                    moved[key] = value
            mark_born(moved, remap.index)
            self.optimizer.state[remap.new] = moved

    def _replace(self, old: nn.Parameter, new: nn.Parameter) -> None:
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        self.parameters = [new if p is old else p for p in self.parameters]


def follow_remap(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``value`` (``[E, P, ...]``, e.g. an optimiser moment) moved as :class:`Remap` says: entry
    ``[e, j, ...]`` of the result is ``value[e, index[e, j], ...]``, 0 where ``index`` is -1."""
    trailing = value.shape[index.dim():]
    shaped = index.view(*index.shape, *([1] * len(trailing)))
    source = torch.gather(value, index.dim() - 1, shaped.clamp(min=0).expand(*index.shape, *trailing))
    return torch.where(shaped >= 0, source, torch.zeros((), dtype=value.dtype, device=value.device))


class TorchEngine(Engine):
    """One process, plain PyTorch (the default ``torch`` engine)."""

    def __init__(self, params: Any = None):
        self.params = params
        self.device = torch.device("cpu")

    def setup(self, run: Any) -> torch.device:
        if run.dist.distributed:
            from srde_core.errors import SRDEError

            raise SRDEError(
                f"engine 'torch' trains in one process, but {run.dist.world_size} were launched; "
                "use engine = \"ddp\" (or \"deepspeed\") for several", key="engine"
            )
        self.device = super().setup(run)
        return self.device

    def start(self, target: TrainingTarget, spec: OptimizerSpec, run: Any) -> EngineSession:
        return TorchSession(target, spec, run.device)
