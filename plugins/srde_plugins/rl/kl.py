"""The KL penalty's coefficient and reference policy of the RL trainers (see :mod:`srde_plugins.rl`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class FixedKLController:
    """A constant coefficient (no ``kl_target``)."""

    def __init__(self, coef: float):
        self.coef = coef

    def update(self, kl: float, sequences: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = state["coef"]


class ProportionalKLController(FixedKLController):
    """Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2, as OpenAI's
    ``lm-human-preferences`` (``train_policy.py``, ``AdaptiveKLController``) codes it: after each batch,
    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta *= 1 + e * n / horizon``, where ``KL`` is the
    batch's mean per-sequence KL (summed over an answer's tokens) and ``n`` the number of sequences in
    the batch (over every process)."""

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, sequences: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * sequences / self.horizon


class ThresholdKLController(FixedKLController):
    """The adaptive KL penalty of Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    sec. 4: ``beta *= 2`` when ``KL > 1.5 target``, ``beta /= 2`` when ``KL < target / 1.5``; fed the
    same per-sequence KL as the proportional controller."""

    def __init__(self, coef: float, target: float):
        super().__init__(coef)
        self.target = target

    def update(self, kl: float, sequences: int) -> None:
        if kl > 1.5 * self.target:
            self.coef *= 2.0
        elif kl < self.target / 1.5:
            self.coef /= 2.0


def kl_controller(params) -> FixedKLController:
    """The controller the trainer's params ask for."""
    if params.kl_target is None:
        return FixedKLController(params.kl_coef)
    if params.kl_controller == "threshold":
        return ThresholdKLController(params.kl_coef, params.kl_target)
    return ProportionalKLController(params.kl_coef, params.kl_target, params.kl_horizon)


class InitialPolicy:
    """The KL reference of RLHF-style PPO (Ziegler et al. 2019; Ouyang et al. 2022) and GRPO
    (DeepSeekMath, sec. 4.1): the policy as it was when RL started. A frozen copy of the trainable
    SRDE parameters, taken at the phase's start and checkpointed with it; :meth:`active` runs a
    block with the copy in place of the live values (the tensors are swapped, not copied) and puts
    them back. Buffers (e.g. selected positions) are shared with the policy."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter]):
        self.parameters = parameters
        self.values = {name: p.detach().clone() for name, p in parameters.items()}

    @contextmanager
    def active(self) -> Iterator[None]:
        live = {name: p.data for name, p in self.parameters.items()}
        try:
            for name, p in self.parameters.items():
                p.data = self.values[name]
            yield
        finally:
            for name, p in self.parameters.items():
                p.data = live[name]

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["values"].items():
            self.values[name].copy_(value)


class ExpertsOff:
    """The base model as the KL reference (``reference = "experts_off"``): no copy."""

    def __init__(self, experts):
        self.experts = experts

    @contextmanager
    def active(self) -> Iterator[None]:
        was = [(mlp, mlp.enabled) for mlp in self.experts.layers.values()]
        try:
            self.experts.set_enabled(False)
            yield
        finally:
            for mlp, enabled in was:
                mlp.enabled = enabled
