"""Between phases: the router warm start runs forward only in the phase's micro-batches, and the
loss summary at the end of ``srde run`` runs through the engine's forward-only mode instead of
gathering the whole model (about 32 GiB per process for Ministral 14B under ZeRO-3)."""

from __future__ import annotations

import importlib.metadata
import re
import textwrap

import pytest
import torch

from conftest import RECIPES
from srde_core.cli import main
from srde_core.train.engine import TorchEngine


@pytest.fixture(scope="module")
def phase1_recipe(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("transitions")
    recipe = workdir / "phase1.toml"
    recipe.write_text(textwrap.dedent(f"""
        extends = "{RECIPES / 'micro.toml'}"
        name = "transitions"
        [[phases]]
        name = "pretrain"
        trainer = {{ name = "expert_pretrain", warm_start_examples = 9 }}
        sampler = "domain_balanced"
        steps = 2
        batch_size = 5
        [[phases]]
        name = "experts"
        trainer = "joint"
        steps = 1
        batch_size = 5
    """))
    return workdir, recipe


def test_the_warm_start_and_the_closing_eval_never_gather_the_whole_model(phase1_recipe, monkeypatch, capsys):
    workdir, recipe = phase1_recipe
    gathered, forwards = [], []
    original_gather, original_forward_only = TorchEngine.gather, TorchEngine.forward_only

    def gather(self, tensors):
        gathered.append([tuple(t.shape) for t in tensors])
        return original_gather(self, tensors)

    def forward_only(self, model):
        forwards.append(model)
        return original_forward_only(self, model)

    monkeypatch.setattr(TorchEngine, "gather", gather)
    monkeypatch.setattr(TorchEngine, "forward_only", forward_only)
    monkeypatch.chdir(workdir)
    batch_rows = []
    from srde_plugins.trainers import expert_pretrain

    original_collate = expert_pretrain.collate

    def collate(rows, *args, **kwargs):
        batch_rows.append(len(rows))
        return original_collate(rows, *args, **kwargs)

    monkeypatch.setattr(expert_pretrain, "collate", collate)
    assert main(["run", str(recipe), "--set", "cache_dir='cache'"]) == 0
    out = capsys.readouterr().out
    assert "routers warm-started" in out and "Eval loss per domain" in out
    assert len(forwards) == 2  # the warm start and the closing eval
    # the banks read their layer's weights, the adapter is exported whole; nothing asks for the
    # whole model (its embedding, 32768 x 64, would be among the tensors)
    assert gathered and not any(shape[0] == 32768 for call in gathered for shape in call if shape)
    # the warm start's forwards: the phase's micro-batches (5 rows), 9 per domain of 6 domains
    assert batch_rows and max(batch_rows) <= 5 and sum(batch_rows) == 9 * 6


def test_the_transformers_pin_has_the_checkpointing_api_srde_calls():
    from transformers import PreTrainedModel

    requirement = next(r for r in importlib.metadata.requires("srde") if r.startswith("transformers"))
    lowest = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))
    assert lowest >= (5, 23)  # activation_checkpointing_enable appeared in transformers 5.23
    assert hasattr(PreTrainedModel, "activation_checkpointing_enable")
