"""The `grpo` and `ppo` trainers (registered by :mod:`srde_plugins.rl`).

One driver step: sample answers to the step's prompts (the policy: experts on), score them, compute
the log-probabilities of the sampled tokens under the policy at sampling time and under the reference
(the policy at the phase's start, or the experts off), then ``epochs`` clipped updates, then the
reward model's updates, if any. The old, reference and new log-probabilities are taken at the
sampling temperature, in the mode the updates train in, and with the same random stream (one seed per
step), so that dropout or a stochastic selector draws the same noise in each and the first update's
ratio is exactly 1. The maths is in :mod:`srde_plugins.rl.objective`. The step driver supplies
resume, checkpoints, metrics, RNG (sampling uses the global RNG, restored on resume) and the data
position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from srde_core.evaluate import evaluation_state
from srde_core.model.context import ForwardContext
from srde_core.train.checkpoints import save_tensors
from srde_core.train.driver import StepContext, TrainingTarget, drive
from srde_core.train.trainer import Trainer
from srde_plugins.rl.kl import ExpertsOff, InitialPolicy, kl_controller
from srde_plugins.rl.objective import (
    answer_imbalance, answer_logprobs, clipped_surrogate, clipped_value_loss, gae, group_advantages, k3_kl,
    token_mean, whiten,
)


@dataclass
class Rollout:
    """``N = prompts * group_size`` sampled answers, right-padded as prompt + answer."""

    ids: torch.Tensor  # [N, L]
    mask: torch.Tensor  # [N, L]
    positions: torch.Tensor  # [N, C]: the position whose output predicts answer token c
    targets: torch.Tensor  # [N, C]: the answer tokens (0 where padded)
    valid: torch.Tensor  # [N, C] bool
    rewards: torch.Tensor  # [N]: the verifier's score, the learned reward and the utilisation term
    verified: torch.Tensor  # [N]: the verifier's score
    correct: torch.Tensor  # [N]
    old: torch.Tensor  # [N, C] log-probabilities under the sampling policy
    ref: torch.Tensor  # [N, C] log-probabilities under the reference
    seed: int  # the random stream of every forward of this step (same noise in old, ref and new)
    values: torch.Tensor | None = None  # [N, C] (ppo)
    answer: tuple[torch.Tensor, torch.Tensor] | None = None  # [N, H] twice: what a reward model reads
    predicted: torch.Tensor | None = None  # [N]: the reward model's prediction
    imbalance: torch.Tensor | None = None  # [N]: each answer's own load imbalance (utilization_weight)


class GRPO(Trainer):
    """Group-relative policy optimisation of the SRDE parameters."""

    uses_values = False
    #: what a step logs beyond loss, grad_norm and lr (an adaptive schedule may follow one)
    step_metrics = ("reward", "accuracy", "kl", "kl_coef", "clip_fraction", "ratio_drift", "answer_imbalance")

    def __init__(self, params):
        self.params = params

    # -- the phase ------------------------------------------------------------------------------
    def run(self, run, phase):
        self.run_ctx = run
        self.experts = run.attach_experts()
        self.verifier = self.params.verifier.build()
        self.verifier.bind(run.data)
        self.kl = kl_controller(self.params)
        self.lm_head = run.model.get_output_embeddings()
        parameters = dict(self.experts.trainable_parameters())
        initial = self.params.reference == "initial"
        self.reference = InitialPolicy(dict(parameters)) if initial else ExpertsOff(self.experts)
        self.value_head = None
        if self.uses_values:
            hidden = self.experts.stack.hidden_size
            self.value_head = nn.Linear(hidden, 1).to(device=run.device, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            parameters.update({f"value_head.{n}": p for n, p in self.value_head.named_parameters()})
        state = {"kl": self.kl, **({"reference": self.reference} if initial else {})}
        self.reward_model = None
        if self.params.reward_model is not None:
            from srde_plugins.rl.reward_model import RewardModelTrainer

            choice = self.params.reward_model
            with torch.random.fork_rng(devices=[]):  # its initialisation leaves the run's random stream alone
                torch.manual_seed(run.recipe.seed)
                model = choice.build(hidden_size=self.experts.stack.hidden_size)
            model = model.to(device=run.device, dtype=torch.float32)
            self.reward_model = state["reward_model"] = RewardModelTrainer(model, choice.params, run.dist, self.params.group_size)
        target = TrainingTarget(run.model, list(parameters.values()), self.get_state, self.set_state)
        result = drive(run, phase, target, self.step, state=state, updates_per_step=self.params.epochs)
        if self.reward_model is not None and run.dist.is_main:
            path = run.run_dir / f"reward_model-{phase.name}.safetensors"
            save_tensors(self.reward_model.model.state_dict(), path)
            run.log(f"{phase.name}: reward model: {path}")
        return result

    def get_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.experts.adapter.state_dict())
        if self.value_head is not None:
            state.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        return state

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.experts.adapter.load_state_dict({k: v for k, v in state.items() if not k.startswith("value_head.")})
        if self.value_head is not None:
            self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in state.items() if k.startswith("value_head.")})

    # -- one step -------------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> dict[str, Any]:
        run, p = ctx.run, self.params
        rows = run.data.train.select(ctx.batches.indices(ctx.step * ctx.phase.grad_accum))
        rollout = self.rollout(ctx, [dict(row) for row in rows])
        advantages, returns = self.advantages(rollout, run.dist)
        stats: dict[str, float] = {}
        clipped, drift = [], 0.0
        for epoch in range(p.epochs):
            with ctx.session.autocast(), self.same_noise(rollout.seed, run.device):
                loss, clip_fraction, ratio_drift = self.loss(ctx, rollout, advantages, returns)
            ctx.session.backward(loss)
            stats = ctx.session.step()
            clipped.append(clip_fraction)
            drift = ratio_drift if epoch == 0 else drift
        learned = {}
        if self.reward_model is not None:
            learned = self.reward_model.fit(rollout.answer, rollout.verified, rollout.predicted)
        # the KL the controller sees: per sequence (summed over an answer's tokens), mean over every process's answers
        per_sequence = ((rollout.old - rollout.ref) * rollout.valid).sum(1)
        totals = run.dist.all_sum(torch.stack([per_sequence.sum().double(), torch.tensor(float(len(per_sequence)),
                                                                                        dtype=torch.float64, device=per_sequence.device)]))
        kl, sequences = float(totals[0] / totals[1]), int(totals[1])
        metrics = {
            "loss": float(loss.detach()), "reward": float(rollout.rewards.mean()), "accuracy": float(rollout.correct.mean()),
            "kl": kl, "kl_coef": self.kl.coef, "clip_fraction": sum(clipped) / len(clipped), "ratio_drift": drift, **stats,
            "tokens": int(rollout.mask.sum()), **learned,
        }
        if rollout.imbalance is not None:
            metrics["answer_imbalance"] = float(rollout.imbalance.mean())
        self.kl.update(kl, sequences)
        return metrics

    @staticmethod
    @contextmanager
    def same_noise(seed: int, device) -> Iterator[None]:
        """Run a block on the random stream ``seed``, leaving the global one as it was."""
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    @torch.no_grad()
    def rollout(self, ctx: StepContext, rows: list[dict[str, Any]]) -> Rollout:
        from transformers import GenerationConfig

        run, p = ctx.run, self.params
        tok, model = run.tokenizer, run.model
        prompts = [tok.encode(row["prompt"], bos=True, eos=False) for row in rows for _ in range(p.group_size)]
        width = max(len(x) for x in prompts)
        ids = torch.full((len(prompts), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        config = GenerationConfig(do_sample=True, temperature=p.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=p.max_new_tokens, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        with evaluation_state(model, self.experts, enabled=True):
            out = model.generate(input_ids=ids.to(run.device), attention_mask=mask.to(run.device), generation_config=config)
        answers = []
        for row in out[:, width:].tolist():
            answers.append(row[: row.index(tok.eos_id) + 1] if tok.eos_id in row else row)  # keep EOS: it is a choice
        rewards, correct = [], []
        for i, answer in enumerate(answers):
            tokens = [t for t in answer if t != tok.eos_id]
            score = float(self.verifier.score(rows[i // p.group_size], tok.decode(tokens), tokens))
            rewards.append(score)
            correct.append(1.0 if score > 0 else 0.0)
        batch = self.pack(prompts, answers, tok.pad_id, run.device)
        seed = int(torch.randint(0, 2**62, (1,)))
        with self.same_noise(seed, run.device), self.experts.forward_context(ForwardContext()) as seen:
            old, hidden, states = self.logprobs(ctx, batch, grad=False)
        with self.same_noise(seed, run.device), self.reference.active():
            ref, _, _ = self.logprobs(ctx, batch, grad=False)
        verified = torch.tensor(rewards, device=run.device)
        rewards_t = verified.clone()
        answer = predicted = None
        if self.reward_model is not None:
            answer = self.answer_summary(states, batch)
            predicted = self.reward_model.predict(answer)
            rewards_t = rewards_t + self.reward_model.params.weight * predicted
        imbalance = None
        if p.utilization_weight and seen.routings:
            imbalance = self.imbalance(seen.ordered_routings(), batch)
            rewards_t = rewards_t - p.utilization_weight * imbalance.to(rewards_t.dtype)
        values = self.value_head(hidden).squeeze(-1) * batch["valid"] if self.value_head is not None else None
        return Rollout(batch["ids"], batch["mask"], batch["positions"], batch["targets"], batch["valid"], rewards_t,
                       verified, torch.tensor(correct, device=run.device), old, ref, seed, values, answer, predicted,
                       imbalance)

    @staticmethod
    def imbalance(routings: list, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each answer's own expert load imbalance, ``[N]``: over its answer tokens' routing only
        (not the prompt's, not padding), mean over layers; the utilisation term of its reward, so
        that answers of one group that route differently get different rewards."""
        at = batch["positions"] + 1  # each answer token's own position
        return torch.stack([answer_imbalance(r.routed, r.num_experts, at, batch["valid"]) for r in routings]).mean(0)

    @staticmethod
    def pack(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
        """Right-padded prompt + answer rows and, per answer token, the position that predicts it."""
        length = max(len(p) + len(a) for p, a in zip(prompts, answers))
        width = max(1, max(len(a) for a in answers))
        n = len(prompts)
        ids = torch.full((n, length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        positions = torch.zeros((n, width), dtype=torch.long)
        targets = torch.zeros((n, width), dtype=torch.long)
        valid = torch.zeros((n, width), dtype=torch.bool)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            row = prompt + answer
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            k = len(answer)
            positions[i, :k] = torch.arange(len(prompt) - 1, len(prompt) - 1 + k)
            targets[i, :k] = torch.tensor(answer, dtype=torch.long)
            valid[i, :k] = True
        return {k: v.to(device) for k, v in dict(ids=ids, mask=mask, positions=positions, targets=targets, valid=valid).items()}

    def logprobs(self, ctx: StepContext, batch: dict[str, torch.Tensor], *,
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities ``[N, C]`` of the answer tokens, the hidden states ``[N, C, H]`` that
        predict them, and all final hidden states ``[N, L, H]``; through the engine's forward when
        ``grad``."""
        with ctx.session.autocast(), torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden = ctx.session.forward(input_ids=batch["ids"], attention_mask=batch["mask"])
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        picked = hidden[rows, batch["positions"]]  # [N, C, H]
        logprobs = answer_logprobs(self.lm_head(picked), batch["targets"], self.params.temperature)
        return logprobs * batch["valid"], picked.float(), hidden

    def answer_summary(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """What a reward model reads of each answer: the mean over its tokens (EOS excluded: every
        finished answer shares it) of the policy's final hidden states and of their input
        embeddings, ``[N, H]`` each (zeros for an empty answer)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        at = batch["positions"] + 1  # each answer token's own position
        valid = (batch["valid"] & (batch["targets"] != self.run_ctx.tokenizer.eos_id))[..., None].float()
        count = valid.sum(1).clamp_min(1)
        embedded = self.run_ctx.model.get_input_embeddings()(batch["ids"][rows, at]).float()
        return (hidden[rows, at].float() * valid).sum(1) / count, (embedded * valid).sum(1) / count

    # -- the objective --------------------------------------------------------------------------
    def advantages(self, rollout: Rollout, dist) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per answer token: the group-relative advantage of its answer (GRPO)."""
        normalised = group_advantages(rollout.rewards, self.params.group_size)
        return normalised.reshape(-1, 1).expand_as(rollout.old) * rollout.valid, None

    def policy_terms(self, new: torch.Tensor, rollout: Rollout, advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The clipped surrogate per token, where it clipped, and the largest ``|ratio - 1|``."""
        policy, clipped = clipped_surrogate(new, rollout.old, advantages, self.params.clip)
        drift = ((new.detach() - rollout.old).exp() - 1).abs()[rollout.valid]
        return policy, clipped & rollout.valid, float(drift.max()) if drift.numel() else 0.0

    @staticmethod
    def _batch(rollout: Rollout) -> dict[str, torch.Tensor]:
        return {"ids": rollout.ids, "mask": rollout.mask, "positions": rollout.positions, "targets": rollout.targets,
                "valid": rollout.valid}

    def loss(self, ctx, rollout: Rollout, advantages, returns) -> tuple[torch.Tensor, float, float]:
        """DeepSeekMath's GRPO objective (eq. 3): per answer, the mean over its tokens of the clipped
        surrogate plus ``beta`` times the k3 KL to the reference; the mean over answers."""
        new, _, _ = self.logprobs(ctx, self._batch(rollout), grad=True)
        policy, clipped, drift = self.policy_terms(new, rollout, advantages)
        per_token = (policy + self.kl.coef * k3_kl(new, rollout.ref)) * rollout.valid
        lengths = rollout.valid.sum(1).clamp_min(1)
        loss = (per_token.sum(1) / lengths).mean()
        return loss, float(clipped.sum() / rollout.valid.sum().clamp_min(1)), drift


class PPO(GRPO):
    """Clipped PPO with a value head, GAE over the answer tokens, and the KL to the reference in the
    reward, as Ziegler et al. 2019 and OpenAI's ``lm-human-preferences`` (``train_policy.py``): per
    token the reward is ``-beta (log pi - log pi_ref)``, plus the answer's score at its last token;
    advantages by GAE (``gamma``, ``gae_lambda``), whitened over the batch; the clipped value loss;
    token means and whitening over every process."""

    uses_values = True

    def advantages(self, rollout: Rollout, dist) -> tuple[torch.Tensor, torch.Tensor]:
        valid = rollout.valid.float()
        rewards = -self.kl.coef * (rollout.old - rollout.ref) * valid
        last = (valid.sum(1).long() - 1).clamp_min(0)
        rows = torch.arange(rewards.shape[0], device=rewards.device)
        rewards[rows, last] += rollout.rewards
        advantages = gae(rewards, rollout.values, rollout.valid, self.params.gamma, self.params.gae_lambda)
        returns = advantages + rollout.values
        return whiten(advantages, rollout.valid, dist), returns

    def loss(self, ctx, rollout: Rollout, advantages, returns) -> tuple[torch.Tensor, float, float]:
        dist = ctx.run.dist
        new, hidden, _ = self.logprobs(ctx, self._batch(rollout), grad=True)
        policy, clipped, drift = self.policy_terms(new, rollout, advantages)
        values = self.value_head(hidden).squeeze(-1)
        value_loss = clipped_value_loss(values, rollout.values, returns, self.params.value_clip)
        loss = token_mean(policy, rollout.valid, dist) + self.params.value_coef * token_mean(value_loss, rollout.valid, dist)
        return loss, float(clipped.sum() / rollout.valid.sum().clamp_min(1)), drift
