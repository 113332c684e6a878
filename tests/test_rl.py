"""RL fine-tuning (`srde_plugins.rl`): on a two-answer task the micro model can learn, GRPO and PPO
raise the reward, the adaptive KL keeps the policy near its budget, and a resumed RL phase is exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams


class SaysYesPlugin:
    """A test plugin: the verifier `says_yes` rewards answers that start with "yes"."""

    @hookimpl
    def srde_register(self, registry):
        registry.add("verifier", "says_yes", make_says_yes, NoParams, "1 for an answer that starts with yes.")


def make_says_yes(params):
    from srde_plugins.rl.contracts import Verifier

    class SaysYes(Verifier):
        def score(self, example, text, tokens):
            return 1.0 if text.strip().lower().startswith("yes") else 0.0

    return SaysYes()


@pytest.fixture(scope="module")
def rl_plugins():
    from srde_core.plugins import load_plugins

    return load_plugins(extra=[("says-yes", SaysYesPlugin())])


def rl_run(workdir, plugins, *overrides, resume=False):
    from conftest import RECIPES, run_recipe_in

    run_recipe_in(workdir, RECIPES / "rl_micro.toml", plugins, list(overrides), resume=resume)
    lines = (workdir / "runs" / "rl" / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["phase"] == "rl"]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_the_reward_goes_up_on_a_task_the_micro_model_can_learn(tmp_path, rl_plugins, algorithm):
    trainer = f'phases.rl.trainer={{ name = "{algorithm}", group_size = 8, max_new_tokens = 2, epochs = 2, verifier = "says_yes" }}'
    rows = rl_run(tmp_path, rl_plugins, trainer)
    rewards = [r["reward"] for r in rows]
    early, late = sum(rewards[:3]) / 3, sum(rewards[-4:]) / 4
    assert 0.2 < early < 0.7, rewards  # the base says yes about half the time
    assert late > early + 0.15, rewards
    assert all(key in rows[-1] for key in ("kl", "kl_coef", "clip_fraction", "accuracy", "grad_norm"))


def test_the_adaptive_kl_keeps_the_policy_within_its_budget(tmp_path, rl_plugins):
    def late_kl(workdir, settings):
        trainer = f'phases.rl.trainer={{ name = "grpo", group_size = 8, max_new_tokens = 2, epochs = 2, verifier = "says_yes", {settings} }}'
        workdir.mkdir()
        rows = rl_run(workdir, rl_plugins, trainer, "phases.rl.steps=16")
        return sum(r["kl"] for r in rows[-6:]) / 6, rows

    target = 0.02
    held, rows = late_kl(tmp_path / "held", f"kl_target = {target}, kl_coef = 0.2")
    free, _ = late_kl(tmp_path / "free", "kl_coef = 0.0")
    assert rows[-1]["kl_coef"] > 0.2  # the controller raised the penalty while the KL was above budget
    assert held < free and held < 3 * target, (held, free)


def test_a_resumed_rl_phase_ends_exactly_where_an_uninterrupted_one_does(tmp_path, rl_plugins):
    trainer = 'phases.rl.trainer={ name = "ppo", group_size = 4, max_new_tokens = 2, epochs = 2, verifier = "says_yes" }'
    rows = rl_run(tmp_path, rl_plugins, trainer)
    run_dir = tmp_path / "runs" / "rl"
    full = load_file(run_dir / "adapter.safetensors")
    shutil.rmtree(run_dir / "checkpoints" / "rl-step0000012")
    (run_dir / "adapter.safetensors").unlink()
    resumed_rows = rl_run(tmp_path, rl_plugins, trainer, resume=True)
    resumed = load_file(run_dir / "adapter.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert resumed_rows[-1]["reward"] == rows[-1]["reward"] and resumed_rows[-1]["kl"] == rows[-1]["kl"]


def test_the_verifier_kind_is_declared_by_the_rl_plugin(plugins):
    from srde_plugins.rl import RLParams

    assert plugins.registries["verifier"].spec.provider == "rl"
    assert "answer" in plugins.registries["verifier"].names()
    assert RLParams.model_fields["verifier"].json_schema_extra["srde_slot"]["kind"] == "verifier"


REWARD_MODEL = 'reward_model = { name = "head", weight = 0.1, lr = 1e-2, updates = 8 }'


def test_the_reward_model_learns_to_predict_the_verifiers_reward(tmp_path, rl_plugins):
    trainer = f'phases.rl.trainer={{ name = "grpo", group_size = 8, max_new_tokens = 2, epochs = 2, verifier = "says_yes", {REWARD_MODEL} }}'
    rows = rl_run(tmp_path, rl_plugins, trainer)
    errors = [r["rm_error"] for r in rows]  # on each step's answers, before it is fitted to them
    assert errors[0] == pytest.approx(rows[0]["accuracy"])  # it starts at 0 (says_yes: reward = accuracy)
    early, late = sum(errors[:2]) / 2, sum(errors[-6:]) / 6
    # the best constant guess of a 0/1 reward with mean a is off by 2a(1-a) on average
    constant = sum(2 * r["accuracy"] * (1 - r["accuracy"]) for r in rows[-6:]) / 6
    assert late < 0.6 * early and late < 0.75 * constant, (errors, constant)
    saved = load_file(tmp_path / "runs" / "rl" / "reward_model-rl.safetensors")
    assert saved["out.weight"].abs().sum() > 0


@pytest.mark.parametrize("objective", ["regression", "bradley_terry"])
def test_the_reward_model_orders_the_answers_to_a_prompt_as_the_verifier_does(objective):
    from srde_plugins.rl.reward_model import HeadRewardModel, RewardModelTrainer
    from srde_core.dist import SINGLE
    from srde_plugins.rl import HeadParams

    torch.manual_seed(0)
    answer = (torch.randn(64, 16), torch.randn(64, 16))
    rewards = (answer[1][:, 0] > 0).float()  # the verifier rewards a direction of the embedded answer
    trainer = RewardModelTrainer(HeadRewardModel(16, 0), HeadParams(lr=5e-2, objective=objective), SINGLE, group_size=8)
    before = trainer.predict(answer)
    for _ in range(10):
        trainer.fit(answer, rewards, trainer.predict(answer))
    predicted, r = trainer.predict(answer).view(-1, 8), rewards.view(-1, 8)
    better = r[:, :, None] > r[:, None, :]  # answer i to a prompt earned more than answer j
    assert bool(before.eq(0).all()) and bool((predicted[:, :, None] > predicted[:, None, :])[better].all())


def test_an_rl_phase_with_a_reward_model_resumes_exactly(tmp_path, rl_plugins):
    trainer = f'phases.rl.trainer={{ name = "ppo", group_size = 4, max_new_tokens = 2, epochs = 2, verifier = "says_yes", {REWARD_MODEL} }}'
    rows = rl_run(tmp_path, rl_plugins, trainer)
    run_dir = tmp_path / "runs" / "rl"
    full = load_file(run_dir / "adapter.safetensors")
    learned = load_file(run_dir / "reward_model-rl.safetensors")
    shutil.rmtree(run_dir / "checkpoints" / "rl-step0000012")
    (run_dir / "adapter.safetensors").unlink()
    (run_dir / "reward_model-rl.safetensors").unlink()
    resumed_rows = rl_run(tmp_path, rl_plugins, trainer, resume=True)
    resumed = load_file(run_dir / "adapter.safetensors")
    relearned = load_file(run_dir / "reward_model-rl.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert learned.keys() == relearned.keys() and all(torch.equal(learned[k], relearned[k]) for k in learned)
    assert [r["rm_error"] for r in resumed_rows[-6:]] == [r["rm_error"] for r in rows[-6:]]


def test_the_reward_model_kind_is_declared_by_the_rl_plugin(plugins):
    from srde_core.errors import RecipeError
    from srde_core.recipe import load_recipe
    from conftest import RECIPES

    assert plugins.registries["reward_model"].spec.provider == "rl"
    recipe = load_recipe(RECIPES / "rl_micro.toml", plugins,
                         [f'phases.rl.trainer={{ name = "grpo", {REWARD_MODEL} }}'])
    choice = recipe.phases[1].trainer.params.reward_model
    assert (choice.name, choice.params.weight, choice.params.objective) == ("head", 0.1, "regression")
    with pytest.raises(RecipeError, match="reward_model"):
        load_recipe(RECIPES / "rl_micro.toml", plugins, ['phases.rl.trainer={ name = "grpo", reward_model = { name = "nope" } }'])
