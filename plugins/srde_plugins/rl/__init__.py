"""RL fine-tuning of the experts: `grpo` and `ppo` trainer phases with a `verifier` component kind.

The policy is the SRDE model; the reference policy is the same model with its experts off, so it
costs no second copy. Each step samples ``group_size`` answers to each of ``batch_size`` training
prompts, scores them with the phase's verifier (the built-in `answer` verifier checks them against the
data's answers with the corpus checkers; register your own for your data), and makes ``epochs``
clipped policy-gradient updates of the SRDE parameters on them, with a KL penalty to the reference:

- ``grpo``: group-relative advantages (each answer's reward minus its group's mean, over the group's
  standard deviation), no value head; the usual choice for verifiable rewards.
- ``ppo``: a value head on the final hidden state, per-token rewards (the verifier's score at the last
  token, minus the KL to the reference at every token) and GAE advantages; value loss added.

``kl_target`` (optional) adapts the KL coefficient (x1.5 when the measured KL exceeds 1.5x the target,
/1.5 below target/1.5), so the policy stays within that budget. An expert-utilisation term
(``utilization_weight``) adds the negative load imbalance of the rollout's routing to the reward.
The verifier kind is declared here (``srde_add_kinds``): a plugin registers a verifier with
``registry.add("verifier", "mine", ...)`` returning a :class:`~srde_plugins.rl.contracts.Verifier`.

An optional learned reward (``reward_model = { name = "head", weight = 0.1, lr = 1e-3 }``): a small
model on what the policy made of each sampled answer (the means over its tokens of the final hidden
states and of the input embeddings) predicts the verifier's reward; ``weight`` times its prediction
is added to each answer's reward, and it is fitted to the verifier's rewards of every step's answers
(``updates`` AdamW steps; regression or Bradley-Terry) while the policy trains.
It is checkpointed with the phase and written beside the adapter (``reward_model-PHASE.safetensors``).
``reward_model`` is a kind declared here too: register your own with ``registry.add("reward_model",
...)`` returning a :class:`~srde_plugins.rl.reward_model.RewardModel`, params subclassing
:class:`RewardModelParams`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params, component
from srde_core.registry import ComponentChoice


class RewardModelParams(Params):
    """How the RL trainers use a reward model; a reward model's own params subclass this."""

    weight: float = Field(0.1, ge=0.0, description="the learned reward's weight in each answer's reward")
    lr: float = Field(1e-3, gt=0.0, description="learning rate of the reward model's own AdamW")
    updates: int = Field(4, ge=1, description="the reward model's optimiser steps on each rollout batch")
    objective: Literal["regression", "bradley_terry"] = Field(
        "regression", description="fit the verifier's rewards (squared error) or their order within a group"
    )


class HeadParams(RewardModelParams):
    hidden: int = Field(0, ge=0, description="width of a GELU hidden layer (0: a linear head on the normalised state)")


class RLParams(Params):
    """Arguments of the `grpo` and `ppo` trainers (nested in the phase's trainer table)."""

    verifier: ComponentChoice = component("verifier", "answer", "scores each sampled answer")
    group_size: int = Field(4, ge=2, description="answers sampled per prompt")
    max_new_tokens: int = Field(8, ge=1, description="length limit of a sampled answer")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the rollouts")
    epochs: int = Field(2, ge=1, description="optimiser updates on each rollout batch")
    clip: float = Field(0.2, gt=0.0, lt=1.0, description="PPO ratio clipping epsilon")
    kl_coef: float = Field(0.05, ge=0.0, description="KL penalty coefficient (initial, when kl_target is set)")
    kl_target: float | None = Field(None, gt=0.0, description="adapt kl_coef so the KL stays near this budget")
    utilization_weight: float = Field(0.0, ge=0.0, description="reward bonus: minus the rollout's expert load imbalance")
    reward_model: ComponentChoice | None = component(
        "reward_model", None, "a learned reward on the policy's final hidden state, trained on the verifier's rewards"
    )

    @model_validator(mode="after")
    def _reward_model_params(self) -> RLParams:
        if self.reward_model is not None and not isinstance(self.reward_model.params, RewardModelParams):
            raise ValueError(f"reward_model '{self.reward_model.name}': its params must subclass "
                             "srde_plugins.rl.RewardModelParams (weight, lr, objective)")
        return self


class PPOParams(RLParams):
    value_coef: float = Field(0.5, ge=0.0, description="weight of the value loss")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda (gamma is 1)")


@hookimpl
def srde_add_kinds(kinds):
    kinds.add("verifier", "Scores a sampled answer (RL rewards).", contract="srde_plugins.rl.contracts:Verifier")
    kinds.add("reward_model", "A learned scalar reward from the policy's final hidden state (RL).",
              contract="srde_plugins.rl.reward_model:RewardModel")


@hookimpl
def srde_register(registry):
    here = "srde_plugins.rl"
    registry.add("verifier", "answer", f"{here}.contracts:AnswerVerifier", NoParams,
                 "1 when the answer matches the example's answer (corpus checkers; first line otherwise), else 0.")
    registry.add("reward_model", "head", f"{here}.reward_model:make_head", HeadParams,
                 "A linear (or one-hidden-layer) head on the answer's normalised mean hidden state and embedding.")
    registry.add("trainer", "grpo", f"{here}.trainer:GRPO", RLParams,
                 "RL with group-relative advantages and a KL penalty to the experts-off reference.")
    registry.add("trainer", "ppo", f"{here}.trainer:PPO", PPOParams,
                 "RL with clipped PPO, a value head, GAE and a KL penalty to the experts-off reference.")
