"""The full_ft baseline: full fine-tuning of the recipe's projections, the rest frozen, saved as the run's base."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file


def test_full_ft_changes_only_the_projections_and_saves_them_as_the_base(tmp_path, plugins, micro_recipe):
    from conftest import run_recipe_in

    overrides = ['phases.experts.trainer="full_ft"', 'phases.experts.losses=["lm"]', "phases.experts.steps=3",
                 "phases.experts.lr=1e-3", "phases.experts.checkpoint_every=0"]
    run = run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    assert run.experts is None
    run_dir = tmp_path / "runs" / "micro"
    tuned = load_file(run_dir / "base" / "model.safetensors")
    pretrained = load_file(next((tmp_path / ".cache" / "srde" / "base").glob("*/model.safetensors")))
    changed = {k for k in tuned if not torch.equal(tuned[k], pretrained[k])}
    projections = {k for k in tuned if k.rsplit(".", 2)[-2] in ("gate_proj", "up_proj", "down_proj")}
    assert changed == projections and projections
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["phase"] == "experts"][-1] == 3
