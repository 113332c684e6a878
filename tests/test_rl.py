"""RL fine-tuning (`srde_plugins.rl`) end to end: on a two-answer task the micro model can learn, GRPO
and PPO raise the reward, the KL coefficient follows its controller, the reference is the policy as
the phase starts, the reward model learns, and a resumed RL phase is exact. The maths is unit-tested
in tests/test_rl_maths.py."""

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


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module's runs: the tiny base is pre-trained once (with attention dropout, so that
    the RL steps' forwards are random and only a shared random stream makes old and new agree)."""
    return tmp_path_factory.mktemp("rl-cache")


SHARED = ['phases.base.trainer={ name = "base_pretrain", cache = true }', "model.config.attention_dropout = 0.1"]


def rl_run(workdir, plugins, cache, *overrides, resume=False, recipe=None, phase="rl"):
    from conftest import RECIPES, run_recipe_in

    settings = [*SHARED, f'cache_dir="{cache}"', *overrides] if recipe is None else [f'cache_dir="{cache}"', *overrides]
    run_recipe_in(workdir, recipe or RECIPES / "rl_micro.toml", plugins, settings, resume=resume)
    lines = (workdir / "runs" / "rl" / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["phase"] == phase]


def test_grpo_raises_the_reward_with_old_and_new_log_probs_that_agree(tmp_path, rl_plugins, shared_cache):
    trainer = ('phases.rl.trainer={ name = "grpo", group_size = 8, max_new_tokens = 2, epochs = 2, verifier = "says_yes", '
               'kl_coef = 0.05, kl_target = 0.5, kl_horizon = 100 }')
    rows = rl_run(tmp_path, rl_plugins, shared_cache, trainer)
    rewards = [r["reward"] for r in rows]
    early, late = sum(rewards[:3]) / 3, sum(rewards[-4:]) / 4
    assert 0.2 < early < 0.7, rewards  # the base says yes about half the time
    assert late > early + 0.15, rewards
    assert all(key in rows[-1] for key in ("kl", "kl_coef", "clip_fraction", "accuracy", "grad_norm"))
    # old log-probs in the update's mode, at the sampling temperature and on the same random stream
    # (attention dropout is on): the first update's ratio is exactly 1
    assert [r["ratio_drift"] for r in rows] == pytest.approx([0.0] * len(rows), abs=1e-5)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy as the phase starts
    # Ziegler et al.'s proportional controller on the per-answer KL, 32 answers a step
    for before, after in zip(rows, rows[1:]):
        error = min(max(before["kl"] / 0.5 - 1, -0.2), 0.2)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error * 32 / 100), rel=1e-9)
    assert rows[-1]["kl_coef"] != rows[0]["kl_coef"]


REWARD_MODEL = 'reward_model = { name = "head", weight = 0.1, lr = 1e-2, updates = 8 }'

WARM_THEN_PPO = """
extends = "{base}"

[model.config]
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 32
tie_word_embeddings = true
attention_dropout = 0.1

[data]
train_files = ["{data}"]

[[phases]]
name = "base"
trainer = {{ name = "base_pretrain", cache = true }}
steps = 40
batch_size = 16
lr = 1e-2

[[phases]]
name = "warm"
trainer = {{ name = "grpo", group_size = 4, max_new_tokens = 2, epochs = 1, verifier = "says_yes" }}
steps = 2
batch_size = 4
lr = 1e-2
log_every = 1

[[phases]]
name = "rl"
trainer = {{ name = "ppo", group_size = 8, max_new_tokens = 2, epochs = 2, verifier = "says_yes", {reward_model} }}
steps = 10
batch_size = 4
lr = 1e-2
log_every = 1
checkpoint_every = 5
"""


def test_ppo_with_a_reward_model_learns_and_resumes_exactly(tmp_path, rl_plugins, shared_cache):
    """A PPO phase after another RL phase: its KL reference is the experts as it starts (not the base),
    the reward and the reward model learn, and a resumed phase ends exactly where this one does."""
    from conftest import RECIPES

    recipe = tmp_path / "warm_then_ppo.toml"
    recipe.write_text(WARM_THEN_PPO.format(base=RECIPES / "rl_micro.toml", data=RECIPES.parent / "data" / "yes_no.jsonl",
                                           reward_model=REWARD_MODEL))
    rows = rl_run(tmp_path, rl_plugins, shared_cache, recipe=recipe)
    run_dir = tmp_path / "runs" / "rl"
    # the reference is the policy at the phase's start: the first step's KL is 0, though the warm phase
    # trained the experts away from the base (with the experts off as the reference it is not 0)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:3]) / 3 + 0.1, rewards
    errors = [r["rm_error"] for r in rows]  # on each step's answers, before it is fitted to them
    assert errors[0] == pytest.approx(rows[0]["accuracy"])  # it starts at 0 (says_yes: reward = accuracy)
    early, late = sum(errors[:2]) / 2, sum(errors[-5:]) / 5
    # the best constant guess of a 0/1 reward with mean a is off by 2a(1-a) on average
    constant = sum(2 * r["accuracy"] * (1 - r["accuracy"]) for r in rows[-5:]) / 5
    assert late < 0.6 * early and late < 0.75 * constant, (errors, constant)

    full = load_file(run_dir / "adapter.safetensors")
    learned = load_file(run_dir / "reward_model-rl.safetensors")
    assert learned["out.weight"].abs().sum() > 0
    shutil.rmtree(run_dir / "checkpoints" / "rl-step0000010")
    (run_dir / "adapter.safetensors").unlink()
    (run_dir / "reward_model-rl.safetensors").unlink()
    resumed_rows = rl_run(tmp_path, rl_plugins, shared_cache, recipe=recipe, resume=True)
    resumed = load_file(run_dir / "adapter.safetensors")
    relearned = load_file(run_dir / "reward_model-rl.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert learned.keys() == relearned.keys() and all(torch.equal(learned[k], relearned[k]) for k in learned)
    assert [r["rm_error"] for r in resumed_rows[-5:]] == [r["rm_error"] for r in rows[-5:]]
    assert resumed_rows[-1]["reward"] == rows[-1]["reward"] and resumed_rows[-1]["kl"] == rows[-1]["kl"]


def test_the_verifier_kind_is_declared_by_the_rl_plugin(plugins):
    from srde_plugins.rl import RLParams

    assert plugins.registries["verifier"].spec.provider == "rl"
    assert "answer" in plugins.registries["verifier"].names()
    assert RLParams.model_fields["verifier"].json_schema_extra["srde_slot"]["kind"] == "verifier"


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
