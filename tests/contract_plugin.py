"""A test plugin that uses nothing but the public contracts of the core (no other plugin's internals).

Loaded in process by the contract tests: ``load_plugins(extra=[(PLUGIN, contract_plugin)])``. It
declares a new component kind and registers one component of every kind a recipe picks by name:

- kind ``probe`` (contract :class:`Probe`): ``recorder`` records the steps and batches of a phase;
  ``impostor`` builds something that is not a Probe (the kind's contract must refuse it);
- trainer ``probed_joint``: joint training written on the public driver and objective, whose params
  hold a component field of the new kind (``probe = component("probe", "recorder")``);
- router ``position_hash``: the flat token ``t`` goes to experts ``(h(t) + j) mod E``, ``j < k``,
  with ``h`` a multiplicative hash of ``t + salt``; gate weights are the chosen experts'
  probabilities under a learned linear gate's softmax (so the gate trains);
  ``not_a_router`` builds something that is not a RouterType;
- combine ``token_gate``: ``w'_tk = w_tk * 2 sigmoid(x_t . v)``, one learned ``v`` per layer,
  zero-initialised so it starts as the plain weighted sum;
- sampler ``sequential``: the training set in order from ``start``, wrapping around;
- engine ``counting``: the torch engine, counting the sessions it starts and their optimiser steps;
- schedule ``step``: a piecewise-constant scalar (``values``, changing at ``boundaries``);
- delta ``masked_dense``: dense per-expert deltas whose bank masks all but a fraction of its
  entries (``set_active_fraction``: the largest ``|dW|`` of each expert).
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from srde_core.data.sampler import Sampler
from srde_core.hookspecs import hookimpl
from srde_core.model.combine import CombineStep, CombineType
from srde_core.model.components import BankCall, DeltaBank, DeltaType
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Router, RouterType, Routing
from srde_core.params import NoParams, Params, component
from srde_core.registry import ComponentChoice
from srde_core.train.engine import TorchEngine, TorchSession
from srde_core.train.schedules import Schedule
from srde_core.train.trainer import Trainer

PLUGIN = "contract-test"
#: ``run.plugin_state`` key under which ``probed_joint`` keeps its probe.
PROBE_STATE = f"{PLUGIN}.probe"


# ---- a new kind: probe -----------------------------------------------------------------------------
class Probe(ABC):
    """The contract of the ``probe`` kind: shown every optimiser step of a phase and its batches."""

    @abstractmethod
    def observe(self, step: int, input_ids: list[torch.Tensor], metrics: dict[str, Any]) -> None:
        """``step`` (0-based), the ``input_ids`` of its micro-batches, and the step's metrics."""


class RecorderParams(Params):
    every: int = Field(1, ge=1, description="record every n-th step")


class RecorderProbe(Probe):
    """Records steps (every ``every``-th), their batches' input ids and their losses."""

    def __init__(self, params: RecorderParams):
        self.every = params.every
        self.steps: list[int] = []
        self.batches: dict[int, list[torch.Tensor]] = {}
        self.losses: dict[int, float] = {}

    def observe(self, step, input_ids, metrics):
        if step % self.every == 0:
            self.steps.append(step)
            self.batches[step] = [ids.detach().cpu().clone() for ids in input_ids]
            self.losses[step] = float(metrics["loss"])


class Impostor:
    """What the ``impostor`` probe and the ``not_a_router`` router build: not their kind's contract."""

    def __init__(self, params: Any = None):
        self.params = params


# ---- a trainer whose params hold a component of the new kind ------------------------------------------
class ProbedJointParams(Params):
    probe: ComponentChoice = component("probe", "recorder", "shown every step and its batches")


class ProbedJoint(Trainer):
    """Joint SRDE training (routers, combine steps and deltas) through the public driver and
    objective; the probe sees every step's batches and metrics."""

    def __init__(self, params: ProbedJointParams):
        self.params = params

    def run(self, run, phase):
        from srde_core.train.driver import TrainingTarget, drive
        from srde_core.train.objective import Objective, supervised_step

        experts = run.attach_experts()
        probe = run.plugin_state(PROBE_STATE, self.params.probe.build)
        target = TrainingTarget(
            model=run.model,
            parameters=list(experts.trainable_parameters().values()),
            get_state=experts.adapter.state_dict,
            set_state=experts.adapter.load_state_dict,
        )
        objective = Objective(run, phase, run.model, experts)
        supervised = supervised_step(objective)

        def step(ctx):
            seen: list[torch.Tensor] = []
            recording = _RecordingBatches(ctx.batches, seen)
            metrics = supervised(replace(ctx, batches=recording))
            probe.observe(ctx.step, seen, metrics)
            return metrics

        return drive(run, phase, target, step, state=objective.schedules)


class _RecordingBatches:
    """The step's batches, noting the input ids of every micro-batch handed out."""

    def __init__(self, batches, seen: list[torch.Tensor]):
        self._batches, self._seen = batches, seen

    def get(self, micro_step: int):
        batch = self._batches.get(micro_step)
        self._seen.append(batch["input_ids"])
        return batch

    def __getattr__(self, name):
        return getattr(self._batches, name)


# ---- router --------------------------------------------------------------------------------------------
HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash


def position_hash(num_tokens: int, num_experts: int, top_k: int, salt: int, device=None) -> torch.Tensor:
    """``[T, k]``: experts ``(h(t) + j) mod E`` of flat token ``t``, ``h(t) = ((t + salt) * M mod 2^32) >> 16``."""
    t = torch.arange(num_tokens, device=device, dtype=torch.long)
    h = ((t + salt) * HASH_MULTIPLIER % 2**32) >> 16
    return (h[:, None] + torch.arange(top_k, device=device)) % num_experts


class PositionHashParams(Params):
    salt: int = Field(0, ge=0, description="added to the token position before hashing")
    init_std: float = Field(0.1, ge=0.0, description="std of the gate's initial weights")


class PositionHashRouter(Router):
    """Token ``t`` to the experts its position hashes to; weights from a learned softmax gate."""

    def __init__(self, hidden_size, num_experts, top_k, generator, salt: int, init_std: float):
        super().__init__()
        self.num_experts, self.top_k, self.salt = num_experts, top_k, salt
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, init_std, generator=generator)

    def route(self, x: torch.Tensor, context: ForwardContext) -> Routing:
        logits = self.gate(x.to(self.gate.weight.dtype))
        probs = torch.softmax(logits, dim=-1)
        experts = position_hash(x.shape[0], self.num_experts, self.top_k, self.salt, x.device)
        return Routing(experts, probs.gather(1, experts), probs, logits, self.num_experts)


class PositionHashType(RouterType):
    def __init__(self, params: PositionHashParams):
        self.params = params

    def make_router(self, hidden_size, num_experts, top_k, generator):
        return PositionHashRouter(hidden_size, num_experts, top_k, generator, self.params.salt, self.params.init_std)


# ---- combine step with a learned parameter ---------------------------------------------------------------
class TokenGate(CombineStep):
    """``w'_tk = w_tk * 2 sigmoid(x_t . v)``; ``v`` starts at zero (the plain weighted sum)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(hidden_size))

    def weights(self, routing: Routing, x: torch.Tensor, context: ForwardContext) -> Routing:
        gate = 2.0 * torch.sigmoid(x.to(self.v.dtype) @ self.v)  # [T]
        return routing.with_weights(routing.weights * gate[:, None].to(routing.weights.dtype))


class TokenGateType(CombineType):
    def __init__(self, params=None):
        self.params = params

    def make_combine(self, hidden_size, num_experts, top_k, generator):
        return TokenGate(hidden_size)


# ---- sampler ---------------------------------------------------------------------------------------------
class SequentialParams(Params):
    start: int = Field(0, ge=0, description="index of the first example of step 0")


class SequentialSampler(Sampler):
    """Examples ``start, start + 1, ...`` in order, wrapping around the training set."""

    def __init__(self, params: SequentialParams):
        self.start = params.start

    def indices(self, dataset, phase, step, batch_size, seed):
        n = len(dataset)
        return [(self.start + step * batch_size + i) % n for i in range(batch_size)]

    def metrics(self, step, batch_size, dataset_size):
        return {"sequential_first": float((self.start + step * batch_size) % dataset_size)}


# ---- engine ----------------------------------------------------------------------------------------------
class CountingSession(TorchSession):
    def __init__(self, engine: CountingEngine, *args):
        super().__init__(*args)
        self.engine = engine

    def step(self):
        self.engine.steps += 1
        return super().step()


class CountingEngine(TorchEngine):
    """The torch engine, counting the sessions it starts and the optimiser steps they take."""

    def __init__(self, params=None):
        super().__init__(params)
        self.starts = 0
        self.steps = 0

    def start(self, target, spec, run):
        self.starts += 1
        return CountingSession(self, target, spec, run.device)


# ---- scalar schedule -------------------------------------------------------------------------------------
class StepScheduleParams(Params):
    values: list[float] = Field(min_length=1, description="the value before each boundary, then after the last")
    boundaries: list[int] = Field(default_factory=list, description="steps at which the next value starts")

    @model_validator(mode="after")
    def _shape(self) -> StepScheduleParams:
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError("a step schedule needs one more value than boundaries")
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError("boundaries must increase")
        return self


class StepSchedule(Schedule):
    """``values[i]`` for ``boundaries[i-1] <= step < boundaries[i]``."""

    def __init__(self, params: StepScheduleParams):
        self.values, self.boundaries = list(params.values), list(params.boundaries)

    def value(self, step, total_steps):
        return self.values[bisect.bisect_right(self.boundaries, step)]


# ---- a delta type whose banks change their active fraction ------------------------------------------------
class MaskedDenseBank(DeltaBank):
    """Dense per-expert deltas ``delta [E, out, in]`` (zero at start) times a 0/1 ``mask`` buffer.

    ``set_active_fraction(f)`` keeps, per expert, the ``round(f * out * in)`` entries of largest
    ``|delta|`` (at least one); 1.0 keeps all. Masked entries keep their values and get no gradient.
    """

    trainable_names = ("delta",)

    def __init__(self, out_features: int, in_features: int, num_experts: int):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.delta = nn.Parameter(torch.zeros(num_experts, out_features, in_features))
        self.register_buffer("mask", torch.ones(num_experts, out_features, in_features))

    @property
    def active_fraction(self) -> float:
        return float(self.mask.float().mean())

    @torch.no_grad()
    def set_active_fraction(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        numel = self.out_features * self.in_features
        keep = max(1, round(fraction * numel))
        top = self.delta.abs().reshape(self.num_experts, numel).topk(keep, dim=1).indices
        flat = torch.zeros(self.num_experts, numel, dtype=self.mask.dtype, device=self.mask.device)
        self.mask.copy_(flat.scatter_(1, top, 1.0).view_as(self.mask))

    def masked(self) -> torch.Tensor:
        return self.delta * self.mask.to(self.delta.dtype)

    def delta_weight(self, expert: int) -> torch.Tensor:
        return self.masked()[expert]

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        dense = self.masked()
        out = x.new_zeros(x.shape[0], self.out_features, dtype=torch.promote_types(x.dtype, dense.dtype))
        groups = call.routing.groups()
        for e in range(self.num_experts):
            tokens, weights = groups.expert(e)
            if tokens.numel():
                term = weights[:, None].to(out.dtype) * (x[tokens].to(out.dtype) @ dense[e].to(out.dtype).T)
                out = out.index_add(0, tokens, term)
        return out


class MaskedDense(DeltaType):
    def __init__(self, params=None):
        self.params = params

    def make_bank(self, weight, num_experts, generator):
        return MaskedDenseBank(weight.shape[0], weight.shape[1], num_experts)


# ---- hooks -----------------------------------------------------------------------------------------------
@hookimpl
def srde_add_kinds(kinds):
    kinds.add("probe", "Shown every optimiser step and its batches (a kind declared by a test plugin).", contract=Probe)


@hookimpl
def srde_register(registry):
    here = __name__
    registry.add("probe", "recorder", f"{here}:RecorderProbe", RecorderParams, "Records steps, batches and losses.")
    registry.add("probe", "impostor", Impostor, NoParams, "Builds something that is not a Probe.")
    registry.add("trainer", "probed_joint", ProbedJoint, ProbedJointParams, "Joint training, watched by a probe.")
    registry.add("router", "position_hash", f"{here}:PositionHashType", PositionHashParams,
                 "Experts by a hash of the token position; learned softmax gate weights.")
    registry.add("router", "not_a_router", Impostor, NoParams, "Builds something that is not a RouterType.")
    registry.add("combine", "token_gate", TokenGateType, NoParams, "Gate weights times 2 sigmoid(x . v), learned v.")
    registry.add("sampler", "sequential", SequentialSampler, SequentialParams, "The training set in order.")
    registry.add("engine", "counting", CountingEngine, NoParams, "The torch engine, counting sessions and steps.")
    registry.add("schedule", "step", StepSchedule, StepScheduleParams, "Piecewise-constant values.")
    registry.add("delta", "masked_dense", MaskedDense, NoParams, "Dense deltas; banks mask all but a fraction.")
