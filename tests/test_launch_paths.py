"""Where a recipe's relative paths resolve, and what the launchers pass on the command line.

* a path given with ``--set`` resolves against the working directory;
* a path from a recipe file resolves against that file's directory (also when another file extends it);
* a path from a shipped preset (``srde:max``, or ``recipes/max.toml`` in a checkout) resolves against
  the working directory: the preset names the user's files, not the package's;
* ``tokenizer.from_model`` reads the model's own tokenizer (a local checkpoint's ``tekken.json``;
  for a hub id, the hub's file), never a local directory named after the hub id;
* the deepspeed launcher's ``--local_rank=N`` (before the command) is accepted and exported as
  ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from srde_core.data.loading import data_with_paths, recipe_tokenizer
from srde_core.errors import SRDEError
from srde_core.recipe import load_recipe


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_set_paths_resolve_against_the_working_directory(plugins, elsewhere):
    recipe = load_recipe(REPO / "recipes" / "max.toml", plugins, ['data.train_files=["my/train.jsonl"]'])
    assert data_with_paths(recipe).train_files == [str(elsewhere / "my" / "train.jsonl")]


@pytest.mark.parametrize("reference", ["srde:max", str(REPO / "recipes" / "max.toml")])
def test_a_shipped_presets_paths_resolve_against_the_working_directory(plugins, elsewhere, reference):
    recipe = load_recipe(reference, plugins)
    assert data_with_paths(recipe).train_files == [str(elsewhere / "data" / "train.jsonl")]
    assert recipe.base_for("model.name_or_path") == elsewhere
    assert not data_with_paths(recipe).eval_files  # optional: a user setting train_files alone can run


def test_a_files_paths_resolve_against_its_own_directory(plugins, elsewhere, tmp_path):
    base = tmp_path / "project" / "base"
    base.mkdir(parents=True)
    (base / "base.toml").write_text('extends = "srde:max"\n[data]\ntrain_files = ["train.jsonl"]\n')
    top = tmp_path / "project" / "exp"
    top.mkdir()
    (top / "exp.toml").write_text('extends = "../base/base.toml"\n[data]\neval_files = ["eval.jsonl"]\n')
    recipe = load_recipe(top / "exp.toml", plugins)
    data = data_with_paths(recipe)
    assert [Path(p).resolve() for p in data.train_files] == [(base / "train.jsonl").resolve()]
    assert [Path(p).resolve() for p in data.eval_files] == [(top / "eval.jsonl").resolve()]
    assert recipe.base_for("model.name_or_path") == elsewhere  # still the preset's: the working directory


def test_tokenizer_from_a_local_checkpoint(plugins, elsewhere):
    from srde_plugins.data.tokenizers import mistral_common_data_dir

    checkpoint = elsewhere / "checkpoints" / "Ministral-3-14B-Reasoning-2512"
    checkpoint.mkdir(parents=True)
    shutil.copy(mistral_common_data_dir() / "tekken_240911.json", checkpoint / "tekken.json")
    tokenizer = recipe_tokenizer(load_recipe("srde:max", plugins))
    assert tokenizer.vocab_size == 131072


def test_tokenizer_of_a_hub_id_is_not_looked_up_in_a_local_directory(plugins, elsewhere, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(elsewhere / "hf-home"))
    recipe = load_recipe("srde:max", plugins, ["model.name_or_path=mistralai/Ministral-3-14B-Reasoning-2512"])
    with pytest.raises(SRDEError) as caught:
        recipe_tokenizer(recipe)
    line = caught.value.line()
    assert "tokenizer.from_model" in line and "mistralai/Ministral-3-14B-Reasoning-2512" in line
    assert "\n" not in line


def test_empty_name_or_path_unsets_the_extended_model(plugins):
    recipe = load_recipe(REPO / "recipes" / "rehearsal" / "max_cpu.toml", plugins)
    assert recipe.model.name_or_path is None and recipe.model.architecture == "Mistral3ForConditionalGeneration"


@pytest.mark.parametrize("flag", [["--local_rank=0"], ["--local-rank", "0"]])
def test_the_launchers_local_rank_flag_is_accepted(flag, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    script = ("import os, sys\nfrom srde_core.cli import main\ncode = main(sys.argv[1:])\n"
              "print('LOCAL_RANK', os.environ.get('LOCAL_RANK'))\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script, *flag, "validate", "srde:tiny"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "LOCAL_RANK 0" in result.stdout
