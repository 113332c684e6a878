"""The reliability catalogue, continued: run names that are paths, results computed from other
inputs than the run's, and mistakes that ``srde validate`` decides before any work.

Each case asserts what the catalogue asserts: the documented exit status, exactly one stderr line
starting ``srde: error:``, no traceback, nothing deleted, nothing left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from srde_core.cli import main

from conftest import RECIPES


def srde(*args: str) -> int:
    return main(list(args))


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, captured.err
    assert err[0].startswith("srde: error: ")
    assert "Traceback" not in captured.err + captured.out
    return err[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (what must survive a refused command)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. the run's name is one directory inside output_dir ------------------------------------------


@pytest.fixture
def sentinels(tmp_path, monkeypatch) -> Path:
    """A working directory with a recipe, another finished-looking run and files that must survive."""
    work = tmp_path / "work"
    (work / "runs" / "other").mkdir(parents=True)
    (work / "runs" / "other" / "recipe.json").write_text("{}\n")
    (work / "runs" / "other" / "adapter.safetensors").write_bytes(b"weights")
    (work / "data.jsonl").write_text("keep me\n")
    shutil.copy(RECIPES / "micro.toml", work / "micro.toml")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious.txt").write_text("keep me too\n")
    monkeypatch.chdir(work)
    return tmp_path


@pytest.mark.parametrize("name", [".", "..", "../x", "a/b", "ABSOLUTE", "a\\b", "runs/../.."],
                         ids=["dot", "dotdot", "up-and-over", "nested", "absolute", "backslash", "traversal"])
@pytest.mark.parametrize("command", ["validate", "run-fresh", "run"])
def test_a_run_name_that_is_a_path_is_refused_and_deletes_nothing(sentinels, capsys, name, command):
    if name == "ABSOLUTE":
        name = str(sentinels / "outside")
    before = tree(sentinels)
    args = {"validate": ["validate"], "run-fresh": ["run", "--fresh"], "run": ["run"]}[command]
    code = srde(args[0], "micro.toml", "--set", f"name={json.dumps(name)}", *args[1:])
    line = one_error_line(capsys)
    assert code == 2
    assert f"name: must be one directory name inside output_dir (no '/' or '\\', not '.' or '..') (got string " in line
    assert tree(sentinels) == before  # the recipe, the other run, the files outside: all there
    assert not (sentinels / "work" / ".cache").exists()  # refused before any work


def test_fresh_deletes_only_a_run_directory(sentinels, capsys):
    work = sentinels / "work"
    (work / "runs" / "notes").mkdir()
    (work / "runs" / "notes" / "todo.txt").write_text("mine\n")
    before = tree(sentinels)
    assert srde("run", "micro.toml", "--set", 'name="notes"', "--fresh") == 1
    line = one_error_line(capsys)
    assert line == (f"srde: error: {Path('runs/notes')}: not a run directory (no recipe.json), so --fresh does not "
                    "delete it; remove it yourself or choose another name")
    assert tree(sentinels) == before


def test_fresh_never_follows_a_link_out_of_output_dir(sentinels, capsys):
    work = sentinels / "work"
    os.symlink(sentinels / "outside", work / "runs" / "link")
    (sentinels / "outside" / "recipe.json").write_text("{}\n")  # even one that looks like a run
    before = tree(sentinels)
    assert srde("run", "micro.toml", "--set", 'name="link"', "--fresh") == 1
    line = one_error_line(capsys)
    assert line == (f"srde: error: {Path('runs/link')}: is not a directory srde created (a link or a file); remove "
                    "it yourself or choose another name")
    assert tree(sentinels) == before


# -- 2. what a result was computed from is checked where it is used ---------------------------------


FAST = ["--set", "phases.base.steps=2", "--set", "phases.experts.steps=2", "--set", "phases.experts.checkpoint_every=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished micro run (two steps a phase, a checkpoint at every step), in its own directory."""
    work = tmp_path_factory.mktemp("round2")
    shutil.copy(RECIPES / "micro.toml", work / "micro.toml")
    previous = os.getcwd()
    os.chdir(work)
    try:
        assert main(["run", "micro.toml", *FAST]) == 0
    finally:
        os.chdir(previous)
    return work / "runs" / "micro"


@pytest.fixture
def in_work(finished, monkeypatch) -> Path:
    monkeypatch.chdir(finished.parents[1])
    return finished.parents[1]


class Kept:
    """Files of the run put back after a case damages them."""

    def __init__(self, *paths: Path):
        self.saved = {p: (p.read_bytes(), p.stat().st_mode) for p in paths}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for path, (data, mode) in self.saved.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)


def test_the_base_cache_key_covers_engine_processes_and_precision(plugins, micro_recipe):
    import types

    import torch

    from srde_core.dist import Dist
    from srde_core.recipe import load_recipe
    from srde_plugins.trainers.base_pretrain import base_key

    def key(*overrides, world_size=1):
        recipe = load_recipe(micro_recipe, plugins, list(overrides))
        run = types.SimpleNamespace(recipe=recipe, tokenizer=types.SimpleNamespace(fingerprint="t"),
                                    data=types.SimpleNamespace(fingerprint="d"), device=torch.device("cpu"),
                                    dist=Dist(rank=0, world_size=world_size, local_rank=0))
        return base_key(run, recipe.phases[0])

    plain = key()
    assert key() == plain  # the same run, the same key
    assert key("engine=\"ddp\"") != plain
    assert key(world_size=2) != plain  # another global batch: other weights
    assert key("phases.base.precision=\"bf16\"") != plain


def test_resume_with_another_process_count_is_refused(finished, in_work, capsys):
    saved = finished / "recipe.json"
    with Kept(saved):
        data = json.loads(saved.read_text())
        assert data["processes"] == 1
        saved.write_text(json.dumps({**data, "processes": 2}))
        before = tree(finished)
        assert srde("run", "micro.toml", *FAST, "--resume") == 1
        line = one_error_line(capsys)
        assert line == ("srde: error: runs/micro: the run started with 2 processes, this resume has 1: the global batch "
                        "would change (base 16 -> 8, experts 16 -> 8); resume it with 2")
        assert tree(finished) == before


def test_an_adapter_of_another_run_is_refused_by_eval_and_generate(finished, in_work, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = finished / "adapter.safetensors"
    with Kept(path):
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(path), metadata={**meta, "recipe_hash": "f" * 64})
        for args in (["eval", str(finished)], ["generate", str(finished), "--prompt", "Q: 1?"]):
            assert srde(*args) == 1
            line = one_error_line(capsys)
            assert line.startswith(f"srde: error: {path}: written by another run (recipe hash ffffffffffff, this run's ")
            assert line.endswith("); it is not this run's adapter")


def test_a_non_finite_adapter_is_refused_by_eval_and_generate(finished, in_work, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = finished / "adapter.safetensors"
    written = (finished / "eval.json").read_bytes() if (finished / "eval.json").exists() else None
    with Kept(path):
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        name = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(path), metadata=meta)
        for args in (["eval", str(finished)], ["generate", str(finished), "--prompt", "Q: 1?"]):
            assert srde(*args) == 1
            line = one_error_line(capsys)
            assert line.startswith(f"srde: error: {path}: holds non-finite values (")
            assert line.endswith("srde never writes such an adapter, so it is damaged or not this run's")
    assert ((finished / "eval.json").read_bytes() if (finished / "eval.json").exists() else None) == written


def test_the_adapter_is_readable_like_every_other_run_file(finished):
    umask = os.umask(0)
    os.umask(umask)
    assert (finished / "adapter.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (finished / "adapter.safetensors").stat().st_mode & 0o777 == (finished / "recipe.json").stat().st_mode & 0o777


def test_eval_labels_a_merged_lora_base_as_what_it_is():
    import types

    from srde_core.evaluate.report import base_label
    from srde_plugins.tracking.tables import loss_table

    assert base_label(types.SimpleNamespace(base=types.SimpleNamespace(id="Ministral3ForCausalLM:from-config"))) == "base"
    merged = types.SimpleNamespace(base=types.SimpleNamespace(id="Ministral3ForCausalLM:pretrained-ab+peft-lora"))
    assert base_label(merged) == "base + peft-lora merged"
    row = {"tokens": 3, "base": 1.0, "srde": None, "delta": None}
    table = loss_table({"examples_per_domain": 1, "loss": {"domains": {"a": row}, "all": row},
                        "base_label": base_label(merged)})
    assert [c.header for c in table.columns][2] == "base + peft-lora merged"


# -- 4. faults: checkpoints, temporary files, the file system ---------------------------------------


def test_a_checkpoint_missing_its_rng_file_is_not_intact(finished, in_work, capsys):
    checkpoints = finished / "checkpoints"
    rng = checkpoints / "experts-step0000002" / "rng-0.pt"
    with Kept(rng, finished / "adapter.safetensors"):
        rng.unlink()
        assert srde("run", "micro.toml", *FAST, "--resume") == 0
        captured = capsys.readouterr()
        out = " ".join(captured.out.split())
        assert "experts: checkpoint experts-step0000002 is damaged (FileNotFoundError: rng-0.pt is missing); " \
               "resuming from experts-step0000001" in out
        assert "Warning" not in captured.err and "warn" not in captured.err


def test_resume_removes_what_killed_writes_left(finished, in_work, capsys):
    litter = [finished / ".adapter.safetensors.abc123.tmp", finished / ".recipe.json.tmp",
              finished / "checkpoints" / ".tmp-experts-step0000002" / "model.safetensors"]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert srde("run", "micro.toml", *FAST, "--resume") == 0
    capsys.readouterr()
    assert not any(p.exists() for p in litter) and not litter[-1].parent.exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    import torch

    from srde_core.errors import SRDEError
    from srde_core.train.checkpoints import CheckpointStore, save_tensors

    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")])}
    with pytest.raises(SRDEError) as caught:
        store.save("experts", 1, lambda d: save_tensors(weights, d / "model.safetensors"), {}, keep=2, final_step=2)
    assert caught.value.line() == (f"{tmp_path / 'run'}: phase 'experts', step 1: non-finite values in the weights "
                                   "(b and 1 more); stopped, the checkpoint was not written")
    assert list(store.root.iterdir()) == []  # no checkpoint, no half-written one


def test_a_checkpoint_write_the_file_system_refuses_is_named_as_such(tmp_path):
    import errno

    from srde_core.errors import SRDEError
    from srde_core.train.checkpoints import CheckpointStore

    def full(directory):
        (directory / "model.safetensors").write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0: " + os.strerror(errno.ENOSPC))

    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    with pytest.raises(SRDEError) as caught:
        store.save("experts", 3, full, {}, keep=2, final_step=4)
    assert caught.value.line() == f"no space left on device writing {store.root / 'experts-step0000003'}"
    assert list(store.root.iterdir()) == []


def _limited(*args: str, cwd: Path, limit: int):
    """``srde ARGS`` in a process whose files may not grow past ``limit`` bytes (``ulimit -f``)."""
    import resource
    import subprocess
    import sys

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "srde_core.cli", *args], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit_files, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_eval_on_a_disk_that_refuses_the_write_is_one_line_without_litter(finished, in_work):
    eval_json = finished / "eval.json"
    with Kept(finished / "recipe.json"):
        eval_json.unlink(missing_ok=True)
        done = _limited("eval", str(finished), cwd=in_work, limit=64)
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert err == [f"srde: error: file size limit exceeded writing {eval_json}"], done.stderr
    assert not eval_json.exists() and not (finished / ".eval.json.tmp").exists()
