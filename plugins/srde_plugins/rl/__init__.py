"""RL fine-tuning of the experts: `grpo` and `ppo` trainer phases with a `verifier` component kind.

The policy is the SRDE model. The KL reference is, by default (``reference = "initial"``), the policy
as it was when the RL phase started, as in RLHF-style PPO (Ziegler et al. 2019) and GRPO (DeepSeekMath):
a frozen copy of the trainable SRDE parameters, checkpointed with the phase (``srde plan`` counts it);
``reference = "experts_off"`` uses the base model instead and costs no copy. Each step samples
``group_size`` answers to each of ``batch_size`` training prompts, scores them with the phase's verifier
(the built-in `answer` verifier checks them against the data's answers with the corpus checkers;
register your own for your data), and makes ``epochs`` clipped policy-gradient updates of the SRDE
parameters on them, with a KL penalty to the reference:

- ``grpo``: group-relative advantages (each answer's reward minus its group's mean, over the group's
  standard deviation) and the k3 KL in the loss (DeepSeekMath); no value head; the usual choice for
  verifiable rewards.
- ``ppo``: a value head on the final hidden state, per-token rewards (the verifier's score at the last
  token, minus ``kl_coef`` times the log-ratio to the reference at every token), GAE advantages
  (``gamma``, ``gae_lambda``) whitened over the batch, and the clipped value loss (lm-human-preferences,
  TRL).

``kl_target`` (optional) adapts the KL coefficient to keep the KL per answer (summed over its tokens)
near that budget: by default with Ziegler et al.'s proportional controller (``kl_horizon``);
``kl_controller = "threshold"`` is the PPO paper's rule (x2 above 1.5 x target, /2 below target / 1.5).
An expert-utilisation term (``utilization_weight``) subtracts from each answer's reward the load
imbalance of its own routing (over its answer tokens), so GRPO's group normalisation keeps it.
The formulas, with their references, are in :mod:`srde_plugins.rl.objective` and :mod:`srde_plugins.rl.kl`.
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
    kl_target: float | None = Field(None, gt=0.0, description="adapt kl_coef so the KL per answer (nats, summed over its tokens) stays near this budget")
    kl_controller: Literal["proportional", "threshold"] = Field(
        "proportional", description="proportional: Ziegler et al. 2019; threshold: the PPO paper's x2 / /2 rule")
    kl_horizon: int = Field(10000, ge=1, description="the proportional controller's horizon (answers)")
    reference: Literal["initial", "experts_off"] = Field(
        "initial", description="the KL reference: the experts as the RL phase starts (a frozen copy), or the base model")
    utilization_weight: float = Field(0.0, ge=0.0, description="reward bonus: minus each answer's own expert load imbalance")
    reward_model: ComponentChoice | None = component(
        "reward_model", None, "a learned reward on the policy's final hidden state, trained on the verifier's rewards"
    )

    @model_validator(mode="after")
    def _reward_model_params(self) -> RLParams:
        if self.reward_model is not None and not isinstance(self.reward_model.params, RewardModelParams):
            raise ValueError(f"reward_model '{self.reward_model.name}': its params must subclass "
                             "srde_plugins.rl.RewardModelParams (weight, lr, objective)")
        return self

    @property
    def trainable_copies(self) -> int:
        """Extra copies of the trainable parameters the trainer keeps (``srde plan``): the reference."""
        return 1 if self.reference == "initial" else 0


class PPOParams(RLParams):
    value_coef: float = Field(0.1, ge=0.0, description="weight of the value loss (0.5 x squared error)")
    value_clip: float | None = Field(0.2, gt=0.0, description="clip the value head's change to this around its rollout value (None: no clipping)")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount per answer token")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")


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
                 "RL with group-relative advantages and a KL penalty to the policy at the phase's start.")
    registry.add("trainer", "ppo", f"{here}.trainer:PPO", PPOParams,
                 "RL with clipped PPO, a value head, GAE and a KL penalty to the policy at the phase's start.")
