"""The ``deepspeed`` engine (registered by :mod:`srde_plugins.runtime`): ZeRO stage 2 or 3.

The DeepSpeed config is generated from the recipe and the phase, then the user's JSON file
(``engine.config``) is merged over it key by key:

* ``train_micro_batch_size_per_gpu`` = the phase's ``batch_size`` (per process),
  ``gradient_accumulation_steps`` = its ``grad_accum``, ``gradient_clipping`` = ``max_grad_norm``;
* ``bf16`` at ZeRO-3 when the model's dtype is bfloat16 (the base is partitioned in bf16 as it is
  built; the SRDE parameters, created in float32 after it, are partitioned in float32 when the
  session starts: DeepSpeed casts no parameter of a model built inside ``zero.Init``, and the
  session checks that none was cast), fp32 otherwise (ZeRO-2 trains the float32 SRDE parameters and leaves the
  frozen base as loaded; a user config that turns bf16 or fp16 on at ZeRO-2 is refused, as
  DeepSpeed would cast every parameter); the forward runs under the phase's autocast
  ``precision`` as in the torch engine;
* ``zero_optimization``: the stage, and CPU offload of the optimiser state (and, at stage 3, of the
  parameters) when asked.

Only the phase's trainable parameters reach the optimiser: torch AdamW from the phase's
:class:`~srde_core.train.engine.OptimizerSpec` (no DeepSpeed op is built), or DeepSpeed's CPU Adam
(``AdamW`` in the config, a compiled op) when the optimiser state is offloaded, which DeepSpeed
requires. The LR schedule is a ``LambdaLR`` of the spec's multiplier, stepped by DeepSpeed.

Micro-batches: the step driver divides each micro-batch's loss by its share already, so DeepSpeed
does not scale by the accumulation count; ``micro_step(last)`` tells it where the accumulation
boundary is (ZeRO reduces the gradients there).

ZeRO-3 partitions every parameter over the processes: the base model as it is built or loaded
(the ``model_init_context`` makes transformers build it inside ``deepspeed.zero.Init``), the
SRDE parameters when the session starts. ``gather`` and ``full_state`` read them whole through
``deepspeed.zero.GatheredParameters``. A base built from its config (no pretrained weights) is
initialised by transformers' ZeRO-3 path: the same distributions, other random draws than in one
process. Checkpoints are DeepSpeed's own (``save_checkpoint``: module
state without the frozen base, each process's optimiser partition, the LR schedule), under
``<checkpoint>/deepspeed/``.

DeepSpeed binds the parameters it partitions and their flat fp32 copies when a session starts: a
parameter replaced or moved during a phase (a bank pruned or resized) cannot be followed, so
:meth:`DeepSpeedSession.remap` refuses it, and adaptive sparsity (which prunes, and at stage 3
reads partitioned values) is refused when the engine is set up, as is ``on_nonfinite = "skip"``
(dropping an update means clearing ZeRO's gradient partitions, which the step cannot do).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from srde_core.errors import RecipeError, SRDEError
from srde_core.train.engine import (BackboneForward, Engine, EngineMemory, EngineSession, OptimizerSpec, TorchSession,
                                   autocast_dtype)

if TYPE_CHECKING:
    from srde_core.model.components import Remap

INSTALL_HINT = 'pip install "srde[deepspeed]"'
ZERO_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size (fp32 at ZeRO-2/3)
CHECKPOINT_TAG = "deepspeed"


def _deepspeed():
    """The deepspeed package (DS_ACCELERATOR=cpu unless CUDA is available); one line when missing."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's ZeRO calls a collective torch deprecates; the warning would repeat every step
    warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated", category=FutureWarning)
    try:
        import deepspeed
    except ImportError as err:
        raise SRDEError(f"engine 'deepspeed' needs the deepspeed package ({err}); {INSTALL_HINT}", key="engine") from None
    return deepspeed


def make_engine(params: Any) -> DeepSpeedEngine:
    """The factory named in the registry (deepspeed itself is imported when the engine is set up,
    before any work, so that ``srde plan`` of a DeepSpeed recipe needs no deepspeed)."""
    return DeepSpeedEngine(params)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` key by key (tables recursively, other values replaced)."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def release_engine(engine: Any) -> None:
    """Destroy a DeepSpeed engine so that nothing keeps it alive: ``destroy()`` leaves the engine's
    hooks on the module it wrapped (our throwaway wrapper), ZeRO-3's list of forward modules
    holding that wrapper, and ZeRO-3's optimiser on every parameter it managed."""
    wrapper = engine.module
    engine.destroy()
    wrapper._forward_pre_hooks.clear()
    wrapper._forward_hooks.clear()
    try:
        from deepspeed.runtime.zero import parameter_offload
    except ImportError:  # pragma: no cover - a DeepSpeed without ZeRO-3 offload
        parameter_offload = None
    if parameter_offload is not None and hasattr(parameter_offload, "FWD_MODULE_STACK"):
        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not wrapper]
    for parameter in wrapper.parameters():
        parameter.__dict__.pop("_z3_optimizer", None)
    release_memory()


def release_memory() -> None:
    """Collect what a torn-down engine left (reference cycles) and give cached device memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CallOn(nn.Module):
    """``CallOn(model)(fn) == fn(model)``: one module whose forward is any computation on ``model``,
    so that a ZeRO-3 engine built over it fetches the parameters the computation uses and ends its
    forward (and its prefetch trace) where the computation ends."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


class DeepSpeedSession(EngineSession):
    """One phase in a ``deepspeed.initialize`` engine over the run's model."""

    def __init__(self, target, spec: OptimizerSpec, engine: DeepSpeedEngine):
        deepspeed = _deepspeed()
        self.target = target
        self.parameters = [p for p in target.parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError("no trainable parameters")
        config = engine.config(spec, trainable_numel=sum(p.numel() for p in self.parameters))
        if engine.params.offload_optimizer:
            optimizer = None  # DeepSpeed's CPU Adam, from config["optimizer"]
        else:
            optimizer = torch.optim.AdamW(self.parameters, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=BackboneForward(target.model),
            model_parameters=self.parameters if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, spec.schedule),
            config=config,
            dist_init_required=False,
        )
        self.forward = self.ds
        cast = [p.dtype for p in self.parameters if p.dtype != torch.float32]
        if cast:
            raise SRDEError(f"DeepSpeed cast the trainable parameters to {cast[0]} (its bf16/fp16 settings); the "
                            "experts train in float32", key="engine.config")
        self.device = engine.run.device
        self.dtype = autocast_dtype(spec.precision, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The phase's precision, as in the torch engine: the bf16 base and the float32 SRDE
        parameters meet in autocast matmuls."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self.ds.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> dict[str, float]:
        lr = self.scheduler.get_last_lr()[0]
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return {"lr": lr, "grad_norm": float(norm) if norm is not None else 0.0}

    def save(self, directory: Path, *, is_main: bool) -> None:
        self.ds.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory / CHECKPOINT_TAG}")

    def remap(self, remaps: list[Remap]) -> None:
        if remaps:
            raise SRDEError(
                "engine 'deepspeed' cannot follow parameters replaced or moved during a phase (a bank "
                "pruned or resized): DeepSpeed bound them when the phase started; use engine = \"ddp\"",
                key="engine",
            )

    def close(self) -> None:
        """Tear the phase's DeepSpeed engine down and free it (its optimiser, fp32 partitions and
        buckets) before the next phase builds its own: two would not fit next to a large base."""
        for parameter in self.parameters:
            parameter.grad = None
        engine, self.ds = self.ds, None
        self.forward = self.optimizer = self.scheduler = None  # type: ignore[assignment]
        release_engine(engine)


class DeepSpeedEngine(Engine):
    """Data parallel with ZeRO (stage 2: optimiser state and gradients partitioned; stage 3: the
    parameters too) over the processes of ``torchrun`` or the ``deepspeed`` launcher."""

    def __init__(self, params: Any):
        self.params = params
        self.run: Any = None
        self.zero = True  # decided in setup (uses_zero)
        self.user: dict[str, Any] = {}
        self._hf_config: Any = None  # transformers' HfDeepSpeedConfig, alive while the run is (ZeRO-3)

    # -- the run ------------------------------------------------------------------------------

    def uses_zero(self, processes: int) -> bool:
        """Whether ZeRO runs at all: with one process it shards nothing and only adds an fp32 master
        copy and its buckets, so one process trains as engine ``torch`` unless ``one_process =
        "zero"`` or an offload (which needs ZeRO) is asked for."""
        params = self.params
        return processes > 1 or params.one_process == "zero" or params.offload_optimizer or params.offload_params

    def setup(self, run: Any) -> torch.device:
        self.run = run
        self.check_recipe(run.recipe)
        self.user = self._user_config(run.recipe)
        deepspeed = _deepspeed()
        self.zero = self.uses_zero(run.dist.world_size)
        if not self.zero:
            run.log("engine deepspeed: one process, so nothing to shard: training as engine 'torch' (no fp32 "
                    "master copy, no ZeRO buckets); engine.one_process = \"zero\" keeps ZeRO")
            return super().setup(run)
        device = super().setup(run)
        if not run.dist.distributed:
            self._single_process_group(device)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        return device

    def check_recipe(self, recipe: Any) -> None:
        """What this engine cannot train, refused before any work (``srde validate`` too)."""
        self._user_config(recipe)
        params = self.params
        if params.offload_params and params.zero_stage != 3:
            raise RecipeError("engine.offload_params needs zero_stage = 3", source=str(recipe.path), key="engine.offload_params")
        for phase in recipe.phases:
            if phase.on_nonfinite == "skip":
                raise RecipeError(
                    "engine 'deepspeed' cannot drop a step's update (its gradients live in ZeRO's partitions); "
                    "use on_nonfinite = \"stop\" or engine = \"ddp\"",
                    source=str(recipe.path), key=f"phases[{phase.index}].on_nonfinite",
                )
        for choice in recipe.srde.delta.nested():
            if choice.kind == "selector" and getattr(choice.build(), "moves_entries", False):
                raise RecipeError(
                    f"selector '{choice.name}' moves the experts' entries during training, which engine "
                    "'deepspeed' cannot follow (ZeRO keeps the parameters it was given); use engine = \"ddp\"",
                    source=str(recipe.path), key="srde.delta.selector",
                )
        try:
            sparsity = recipe.settings("adaptive_sparsity")
        except KeyError:  # the plugin is not installed
            return
        if sparsity.enabled and (sparsity.prune or params.zero_stage == 3):
            why = "prunes the banks (replaces their parameters)" if sparsity.prune else "reads partitioned values at ZeRO-3"
            raise RecipeError(
                f"adaptive sparsity {why}, which engine 'deepspeed' cannot follow; use engine = \"ddp\", or "
                "zero_stage = 2 with [plugins.adaptive_sparsity] prune = false",
                source=str(recipe.path), key="plugins.adaptive_sparsity",
            )

    def _user_config(self, recipe: Any) -> dict[str, Any]:
        if not self.params.config:
            return {}
        path = Path(self.params.config).expanduser()
        if not path.is_absolute():
            path = recipe.base_for("engine.config") / path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else f"not JSON: {err}"
            raise RecipeError(f"DeepSpeed config '{path}' cannot be read ({reason})", source=str(recipe.path),
                            key="engine.config") from None
        if not isinstance(data, dict):
            raise RecipeError(f"DeepSpeed config '{path}' is not a JSON object", source=str(recipe.path), key="engine.config")
        for half in ("bf16", "fp16"):
            section = data.get(half)
            if self.params.zero_stage == 2 and isinstance(section, dict) and section.get("enabled"):
                raise RecipeError(
                    f"DeepSpeed config '{path}' enables {half} at ZeRO-2, which casts every parameter, the "
                    "experts' float32 ones too; leave it out (the base keeps model.dtype, and the phase's "
                    "precision autocasts the matmuls)", source=str(recipe.path), key="engine.config")
        return data

    @staticmethod
    def _single_process_group(device: torch.device) -> None:
        """DeepSpeed needs a process group, and ``LOCAL_RANK`` in the environment, even for one
        process. Under a launcher (torchrun or ``deepspeed`` with one process) the group joins the
        launcher's rendezvous (``env://``: a group of our own on another port would leave the
        launcher's store waiting); a plain ``srde run`` gets a group of one on 127.0.0.1."""
        import torch.distributed as td

        if td.is_initialized():
            return
        launched = bool(os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"))
        if not launched:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                              rank=0, world_size=1)

    # -- the config ---------------------------------------------------------------------------

    def config(self, spec: OptimizerSpec | None = None, trainable_numel: int | None = None) -> dict[str, Any]:
        """The DeepSpeed config of a phase (``spec``; None: what model construction needs)."""
        params, recipe = self.params, self.run.recipe
        zero: dict[str, Any] = {"stage": params.zero_stage}
        if params.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if params.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        # ZeRO-3 partitions the base in its own dtype only with bf16 on (else it would cast it to
        # float32); ZeRO-2 leaves the frozen base as loaded and would flatten the trainable float32
        # parameters into bf16, so it trains them in float32 (autocast does the mixed precision)
        bf16 = recipe.model.dtype == "bfloat16" and params.zero_stage == 3
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if trainable_numel is not None:
            # DeepSpeed allocates its buckets whole (5e8 elements, 2 GB in fp32, by default): no
            # larger than what they carry
            bucket = int(min(ZERO_REDUCE_BUCKET, max(trainable_numel, 1 << 20)))
            zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if spec is not None:
            config["train_micro_batch_size_per_gpu"] = spec.batch_size
            config["gradient_accumulation_steps"] = spec.grad_accum
            config["gradient_clipping"] = spec.max_grad_norm or 0.0
            if params.offload_optimizer:
                config["optimizer"] = {"type": "AdamW", "params": {
                    "lr": spec.lr, "betas": list(spec.betas), "weight_decay": spec.weight_decay}}
        return merge(config, self.user)

    # -- the engine contract ------------------------------------------------------------------

    def model_init_context(self) -> contextlib.AbstractContextManager | None:
        return self._zero3_construction() if self.zero and self.params.zero_stage == 3 else None

    @contextlib.contextmanager
    def _zero3_construction(self) -> Iterator[None]:
        """While an ``HfDeepSpeedConfig`` of stage 3 is alive, transformers builds and loads its
        models inside ``deepspeed.zero.Init`` (partitioned as they are created) and reads
        pretrained weights into the partitions. Entering ``zero.Init`` around it as well would
        load the weights wrongly; the config stays alive for the run (transformers consults it)."""
        _deepspeed()
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_config = HfDeepSpeedConfig(self.config())
        yield

    def gather(self, tensors: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        partitioned = [t for t in tensors if hasattr(t, "ds_id")]
        if not partitioned:
            return contextlib.nullcontext()
        return _deepspeed().zero.GatheredParameters(partitioned, modifier_rank=None)

    def modifying(self, tensors: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        partitioned = [t for t in tensors if hasattr(t, "ds_id")]
        if not partitioned:
            return contextlib.nullcontext()
        return _deepspeed().zero.GatheredParameters(partitioned, modifier_rank=0)

    @property
    def collective_forwards(self) -> bool:  # type: ignore[override]
        return self.zero and self.params.zero_stage == 3

    @contextlib.contextmanager
    def forward_only(self, model: nn.Module) -> Iterator[Any]:
        """At ZeRO-3 a forward needs DeepSpeed's parameter hooks, which a finished phase's engine
        took with it: an inference engine (no optimiser) over :class:`CallOn` of the model fetches
        each layer's parameters as the computation reaches it, on every process; torn down after."""
        if not self.collective_forwards:
            yield lambda fn: fn(model)
            return
        engine, *_ = _deepspeed().initialize(model=CallOn(model), config=self.config(), dist_init_required=False)
        try:
            yield lambda fn: engine(fn)
        finally:
            release_engine(engine)

    @contextlib.contextmanager
    def full_state(self, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        with self.gather(list(module.parameters())):
            yield {name: t.detach().clone() for name, t in module.state_dict().items()}

    def start(self, target, spec: OptimizerSpec, run: Any) -> EngineSession:
        if not self.zero:
            return TorchSession(target, spec, run.device)
        return DeepSpeedSession(target, spec, self)

    def memory(self, gpus: int) -> EngineMemory:
        params = self.params
        if not self.uses_zero(gpus):
            return EngineMemory(notes=("deepspeed with one process trains as engine 'torch' (engine.one_process)",))
        stage = params.zero_stage
        notes = [f"ZeRO-{stage}: fp32 master copy and optimiser state / {gpus}, gradients / {gpus}"
                 + (f", parameters / {gpus}" if stage == 3 else "")]
        if params.offload_params:
            notes.append("parameters offloaded to CPU memory (offload_params)")
        if params.offload_optimizer:
            notes.append("optimiser state and master copy offloaded to CPU memory (offload_optimizer)")
        return EngineMemory(
            param_shards=gpus if stage == 3 else 1, grad_shards=gpus, optimizer_shards=gpus,
            params_offloaded=params.offload_params, optimizer_offloaded=params.offload_optimizer, master_copy=True,
            bucket_elements=ZERO_REDUCE_BUCKET, bucket_floor=1 << 20, gathered_layers=2 if stage == 3 else 0, notes=tuple(notes),
            scheme=f"ZeRO-{stage}", master_detail="fp32 flat partitions of the trainable parameters (ZeRO)",
            bucket_detail="ZeRO: fp32 reduce bucket (DeepSpeed's default 5e8 elements)")
