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
