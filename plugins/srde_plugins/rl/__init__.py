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
"""

from __future__ import annotations

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params, component
from srde_core.registry import ComponentChoice


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


class PPOParams(RLParams):
    value_coef: float = Field(0.5, ge=0.0, description="weight of the value loss")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda (gamma is 1)")


@hookimpl
def srde_add_kinds(kinds):
    kinds.add("verifier", "Scores a sampled answer (RL rewards).", contract="srde_plugins.rl.contracts:Verifier")


@hookimpl
def srde_register(registry):
    here = "srde_plugins.rl"
    registry.add("verifier", "answer", f"{here}.contracts:AnswerVerifier", NoParams,
                 "1 when the answer matches the example's answer (corpus checkers; first line otherwise), else 0.")
    registry.add("trainer", "grpo", f"{here}.trainer:GRPO", RLParams,
                 "RL with group-relative advantages and a KL penalty to the experts-off reference.")
    registry.add("trainer", "ppo", f"{here}.trainer:PPO", PPOParams,
                 "RL with clipped PPO, a value head, GAE and a KL penalty to the experts-off reference.")
