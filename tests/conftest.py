"""Shared fixtures: the real plugin set (loaded through entry points, like `srde` does)."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = Path(__file__).parent / "recipes"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def plugins():
    from srde_core.plugins import load_plugins

    return load_plugins()


@pytest.fixture
def micro_recipe() -> Path:
    return RECIPES / "micro.toml"


def run_recipe_in(workdir: Path, recipe_path: Path, plugins, overrides=(), **kwargs):
    """Run a recipe with ``workdir`` as the working directory; returns the finished RunContext."""
    import io
    import os

    from rich.console import Console

    from srde_core.recipe import load_recipe
    from srde_core.run import execute

    previous = os.getcwd()
    os.chdir(workdir)
    try:
        recipe = load_recipe(recipe_path, plugins, list(overrides))
        return execute(recipe, plugins, Console(file=io.StringIO(), width=120), **kwargs)
    finally:
        os.chdir(previous)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, plugins) -> Path:
    """One finished run of tests/recipes/micro.toml (shared: it takes seconds, not milliseconds)."""
    workdir = tmp_path_factory.mktemp("micro-run")
    run_recipe_in(workdir, RECIPES / "micro.toml", plugins)
    return workdir / "runs" / "micro"
