"""A test plugin that exercises every contract of the core through its public surface only.

It declares a component kind (`probe`) and registers one component of each kind a run picks by
name: a router (`by_position`), a combine step (`scaled`), a sampler (`in_order`), an engine
(`counting`), a scalar schedule (`switch`), a delta type whose banks change their active fraction
(`masked_dense`), a probe (`counter`) and a trainer (`probed_joint`) whose params name a probe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from pydantic import Field
from torch import nn

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params, component
from srde_core.registry import ComponentChoice

PLUGIN = "contract-kit"


# ---- a new kind -----------------------------------------------------------------------------------
class Probe(ABC):
    """The contract of the `probe` kind: told about every optimiser step."""

    @abstractmethod
    def touch(self, step: int) -> None: ...


class CounterProbe(Probe):
    def __init__(self, params=None):
        self.steps: list[int] = []

    def touch(self, step: int) -> None:
        self.steps.append(step)


class ProbedJointParams(Params):
    probe: ComponentChoice = component("probe", "counter", "told about every step")


class ProbedJoint:
    """The joint trainer written with the public driver, objective and supervised step; its probe
    (a component of the plugin's own kind) sees every step."""

    def __init__(self, params: ProbedJointParams):
        self.params = params

    def run(self, run, phase):
        from srde_core.train.driver import TrainingTarget, drive
        from srde_core.train.objective import Objective, supervised_step

        experts = run.attach_experts()
        probe = run.plugin_state("probe", self.params.probe.build)
        target = TrainingTarget(run.model, list(experts.trainable_parameters().values()),
                                experts.adapter.state_dict, experts.adapter.load_state_dict)
        objective = Objective(run, phase, run.model, experts)
        supervised = supervised_step(objective)

        def step(ctx):
            metrics = supervised(ctx)
            probe.touch(ctx.step)
            return metrics

        return drive(run, phase, target, step, state=objective.schedules)


def make_trainer(params):
    from srde_core.train.trainer import Trainer

    class Probed(ProbedJoint, Trainer):
        pass

    return Probed(params)


# ---- router and combine step ------------------------------------------------------------------------
def make_router_type(params):
    from srde_core.model.routing import Router, RouterType, Routing

    class ByPosition(Router):
        """Token t goes to expert t mod E (k = 1), weighted by its softmax probability (trainable)."""

        def __init__(self, hidden, num_experts, top_k, generator):
            super().__init__()
            self.num_experts, self.top_k = num_experts, 1
            self.gate = nn.Linear(hidden, num_experts, bias=False)
            with torch.no_grad():
                self.gate.weight.normal_(0.0, 0.1, generator=generator)

        def route(self, x, context):
            logits = self.gate(x.to(self.gate.weight.dtype)).float()
            probs = torch.softmax(logits, -1)
            experts = (torch.arange(x.shape[0], device=x.device) % self.num_experts)[:, None]
            return Routing(experts, probs.gather(1, experts), probs, logits, self.num_experts)

    class ByPositionType(RouterType):
        def make_router(self, hidden_size, num_experts, top_k, generator):
            return ByPosition(hidden_size, num_experts, top_k, generator)

    return ByPositionType()


def make_combine_type(params):
    from srde_core.model.combine import CombineStep, CombineType

    class Scaled(CombineStep):
        """Every expert weight times (1 + s), one learned s per layer (starts at 0)."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))

        def weights(self, routing, x, context):
            return routing.with_weights(routing.weights * (1.0 + self.scale))

    class ScaledType(CombineType):
        def make_combine(self, hidden_size, num_experts, top_k, generator):
            return Scaled()

    return ScaledType()


# ---- sampler, engine, schedule ------------------------------------------------------------------------
def make_sampler(params):
    from srde_core.data.sampler import Sampler

    class InOrder(Sampler):
        """The training set in order, wrapping around."""

        def indices(self, dataset, phase, step, batch_size, seed):
            return [(step * batch_size + i) % len(dataset) for i in range(batch_size)]

    return InOrder()


def make_engine(params):
    from srde_core.train.engine import TorchEngine

    class Counting(TorchEngine):
        """The torch engine, counting sessions and optimiser steps (in the run's plugin state)."""

        def start(self, target, spec, run):
            counts = run.plugin_state("engine-counts", lambda: {"sessions": 0, "steps": 0})
            counts["sessions"] += 1
            session = super().start(target, spec, run)
            plain_step = session.step

            def counted_step():
                counts["steps"] += 1
                return plain_step()

            session.step = counted_step
            return session

    return Counting()


class SwitchParams(Params):
    before: float = 1.0
    after: float = 0.0
    at: int = Field(3, ge=0)


def make_schedule(params: SwitchParams):
    from srde_core.train.schedules import Schedule

    class Switch(Schedule):
        def value(self, step, total_steps):
            return params.before if step < params.at else params.after

    return Switch()


# ---- a bank whose active fraction changes -------------------------------------------------------------
def make_masked_dense(params):
    from srde_core.model.components import DeltaBank, DeltaType

    class MaskedDense(DeltaBank):
        """Dense per-expert deltas; ``set_active_fraction`` keeps the largest |delta| per expert."""

        trainable_names = ("delta",)

        def __init__(self, out_features, in_features, num_experts):
            super().__init__()
            self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
            self.delta = nn.Parameter(torch.zeros(num_experts, out_features, in_features))
            self.register_buffer("mask", torch.ones(num_experts, out_features * in_features))

        @property
        def active_fraction(self):
            return float(self.mask.mean())

        @torch.no_grad()
        def set_active_fraction(self, fraction):
            keep = max(1, round(fraction * self.out_features * self.in_features))
            top = self.delta.abs().reshape(self.num_experts, -1).topk(keep, dim=1).indices
            self.mask.zero_().scatter_(1, top, 1.0)

        def dense(self):
            return self.delta * self.mask.view_as(self.delta)

        def delta_weight(self, expert):
            return self.dense()[expert]

        def forward(self, x, call):
            dense = self.dense().to(x.dtype)
            out = x.new_zeros(x.shape[0], self.out_features)
            groups = call.routing.groups()
            for e in range(self.num_experts):
                tokens, weights = groups.expert(e)
                if tokens.numel():
                    out = out.index_add(0, tokens, weights[:, None].to(x.dtype) * (x[tokens] @ dense[e].T))
            return out

    class MaskedDenseType(DeltaType):
        def make_bank(self, weight, num_experts, generator):
            return MaskedDense(weight.shape[0], weight.shape[1], num_experts)

    return MaskedDenseType()


class WrongThing:
    """What the `broken` probe builds: not a Probe."""


@hookimpl
def srde_add_kinds(kinds):
    kinds.add("probe", "Told about every optimiser step (a kind declared by a test plugin).",
              contract="contract_kit:Probe")


@hookimpl
def srde_register(registry):
    registry.add("probe", "counter", "contract_kit:CounterProbe", NoParams, "Counts steps.")
    registry.add("probe", "broken", lambda params: WrongThing(), NoParams, "Builds the wrong type.")
    registry.add("trainer", "probed_joint", make_trainer, ProbedJointParams, "Joint training with a probe.")
    registry.add("router", "by_position", make_router_type, NoParams, "Token t to expert t mod E.")
    registry.add("combine", "scaled", make_combine_type, NoParams, "Expert weights times a learned (1 + s).")
    registry.add("sampler", "in_order", make_sampler, NoParams, "The training set in order.")
    registry.add("engine", "counting", make_engine, NoParams, "The torch engine, counting.")
    registry.add("schedule", "switch", make_schedule, SwitchParams, "One value, then another.")
    registry.add("delta", "masked_dense", make_masked_dense, NoParams, "Dense deltas with an active fraction.")
