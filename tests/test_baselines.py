"""The ``peft_lora`` baseline trainer: PEFT LoRA at the experts' trainable count, merged into the base."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import run_recipe_in
from srde_plugins.baselines.peft_lora import _merge_and_unload, lora_parameter_count

PEFT = ['phases.experts.trainer={name="peft_lora"}', 'phases.experts.losses=["lm"]']


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(6, 10, bias=False)
        self.down_proj = torch.nn.Linear(10, 6, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def test_merging_puts_plain_linears_back_with_w_plus_scaled_ba():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    model = Block().double()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6.0, target_modules=["up_proj", "down_proj"]), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p)  # B starts at zero: give the delta a value
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = model(x)
    a, b = model.up_proj.lora_A["default"].weight.clone(), model.up_proj.lora_B["default"].weight.clone()
    _merge_and_unload(model, LoraLayer)
    assert type(model.up_proj) is torch.nn.Linear and type(model.down_proj) is torch.nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.up_proj.weight, base["up_proj.weight"] + 2.0 * b @ a)
    assert lora_parameter_count(Block(), ["up_proj", "down_proj"], 3) == 3 * (6 + 10) * 2


def test_peft_lora_matches_the_experts_count_and_leaves_a_tuned_base(tmp_path, plugins, micro_recipe):
    from srde_core.run import open_finished_run

    import os

    from srde_core.recipe import load_recipe
    from srde_core.run import execute

    out = io.StringIO()
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        run = execute(load_recipe(micro_recipe, plugins, PEFT), plugins, Console(file=out, width=200))
    finally:
        os.chdir(previous)
    assert run.experts is None
    lora = run_recipe_in(tmp_path, micro_recipe, plugins, ["name=srde"])  # the same recipe with experts
    experts = sum(p.numel() for p in lora.experts.trainable_parameters().values())
    per_rank = lora_parameter_count(lora.model, list(run.recipe.srde.projections), 1)
    line = next(line for line in out.getvalue().splitlines() if "PEFT LoRA rank" in line)
    count = int(re.search(r"([\d,]+) trainable", line).group(1).replace(",", ""))
    assert abs(count - experts) <= per_rank / 2, (count, experts)

    cached = load_file(next((tmp_path / ".cache" / "srde" / "base").glob("*/model.safetensors")))
    tuned = load_file(tmp_path / "runs" / "micro" / "base" / "model.safetensors")
    assert set(tuned) == set(cached)  # plain weights, no lora_ tensors left
    changed = {k for k in cached if not torch.equal(cached[k], tuned[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in run.recipe.srde.projections for k in changed)

    reopened = open_finished_run(tmp_path / "runs" / "micro", Console(file=io.StringIO()))
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        run.model.eval()
        torch.testing.assert_close(reopened.model(ids).logits, run.model(ids).logits)


def test_peft_lora_after_experts_is_refused(tmp_path, plugins, micro_recipe):
    from srde_core.errors import SRDEError

    overrides = ['phases.base.trainer="joint"', 'phases.base.losses=["lm"]', *PEFT]
    with pytest.raises(SRDEError, match="peft_lora trains the base"):
        run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
