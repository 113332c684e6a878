"""A third-party plugin, installed as its own distribution, is discovered and used from a recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "srde-example-plugin"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """pip-install the example into a private target dir: a real .dist-info with entry_points.txt."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    )
    assert list(target.glob("srde_example_plugin-*.dist-info/entry_points.txt"))
    return target


def srde(args, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "srde_core.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_example_component_is_listed_with_its_distribution(installed_example, tmp_path):
    result = srde(["list-plugins", "--json"], installed_example, tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (plugin,) = [p for p in data["plugins"] if p["name"] == "inverse-sqrt"]
    assert (plugin["distribution"], plugin["version"], plugin["error"]) == ("srde-example-plugin", "0.1.0", None)
    assert {"kind": "scheduler", "name": "inverse_sqrt"} in plugin["provides"]


def test_example_component_is_absent_without_the_distribution(tmp_path):
    result = srde(["list-plugins", "--json"], tmp_path, tmp_path)
    assert "inverse_sqrt" not in {c["name"] for c in json.loads(result.stdout)["components"]}


def test_example_component_works_from_a_recipe(installed_example, tmp_path, micro_recipe):
    recipe = tmp_path / "uses_example.toml"
    recipe.write_text(
        f'extends = "{micro_recipe.as_posix()}"\nname = "example"\n'
        "[[phases]]\nname = \"base\"\ntrainer = \"base_pretrain\"\nsteps = 2\nbatch_size = 4\n"
        "scheduler = { name = \"inverse_sqrt\", warmup_steps = 1 }\n"
    )
    shown = srde(["show", str(recipe), "--json"], installed_example, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["phases"][0]["scheduler"] == {"name": "inverse_sqrt", "warmup_steps": 1}
    bad = srde(["validate", str(recipe), "--set", "phases.0.scheduler.warmup_steps=0"], installed_example, tmp_path)
    assert bad.returncode == 2 and "phases[0].scheduler.warmup_steps" in bad.stderr
    ran = srde(["run", str(recipe)], installed_example, tmp_path)
    assert ran.returncode == 0, ran.stderr + ran.stdout
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "example" / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in metrics if m.get("phase") == "base"]
    # inverse_sqrt with warmup 1: lr * 1, then lr * sqrt(1/2)
    assert lrs[-1] == pytest.approx(1e-3 * 0.5**0.5)


def test_the_example_s_own_test_uses_the_shipped_testing_kit(installed_example, tmp_path):
    """The out-of-tree delta is held to the dense reference by srde_core.testing, from its own tests."""
    test = EXAMPLE / "tests" / "test_full_delta.py"
    assert "from srde_core.testing import assert_exact" in test.read_text()
    env = {**os.environ, "PYTHONPATH": str(installed_example)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_example_delta_is_listed_and_validates(installed_example, tmp_path, micro_recipe):
    recipe = tmp_path / "full.toml"
    recipe.write_text(f'extends = "{micro_recipe.as_posix()}"\n[srde]\ndelta = {{ name = "full", scale = 0.5 }}\n')
    assert srde(["validate", str(recipe)], installed_example, tmp_path).returncode == 0
    bad = srde(["validate", str(recipe), "--set", "srde.delta.scale=0"], installed_example, tmp_path)
    assert bad.returncode == 2 and "srde.delta.scale" in bad.stderr
