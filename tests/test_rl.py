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
