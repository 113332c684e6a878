"""`srde plan` counts what the RL trainers keep beyond the trained state: the frozen KL reference."""

from __future__ import annotations

from conftest import RECIPES

from srde_core.plugins import load_plugins
from srde_core.recipe import load_recipe
from srde_plugins.runtime.plan import plan_memory


def rl_plan(reference: str):
    recipe = load_recipe(RECIPES / "rl_micro.toml", load_plugins(),
                         [f'phases.rl.trainer={{ name = "ppo", reference = "{reference}" }}'])
    return plan_memory(recipe, tokenizer_vocab=32768, phase="rl", device="cpu")


def test_the_rl_reference_copy_is_one_copy_of_the_trainable_parameters():
    initial, off = rl_plan("initial"), rl_plan("experts_off")
    names = [row.name for row in off.rows]
    assert "trainer's copies" not in names  # the experts-off reference costs nothing
    copy = initial.row("trainer's copies").bytes
    assert copy == initial.row("gradients").bytes > 0  # fp32 trainable parameters, one copy, as their gradients
    assert initial.allocated - off.allocated == copy
