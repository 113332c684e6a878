"""The public Python API (re-exported as the package ``srde``); the CLI uses these functions."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

EXPERTS_ATTRIBUTE = "srde_experts"


def _quiet_console():
    from rich.console import Console

    return Console(file=io.StringIO())


def run(
    recipe: str | Path,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    fresh: bool = False,
    console: Any = None,
    plugins: Any = None,
) -> Path:
    """Run a recipe (a file or ``srde:NAME``) in this process; return its run directory.

    ``overrides`` are ``--set`` assignments (``"phases.experts.steps=50"``). Progress goes to
    ``console`` (a rich Console; default: none). User mistakes raise :class:`srde.errors.SRDEError`
    (one line, as the CLI prints it).
    """
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe
    from srde_core.run import execute

    from srde_core.errors import UsageError

    if resume and fresh:
        raise UsageError("--resume and --fresh exclude each other")
    plugins = plugins if plugins is not None else load_plugins()
    loaded = load_recipe(recipe, plugins, _overrides(overrides))
    finished = execute(loaded, plugins, console if console is not None else _quiet_console(), resume=resume, fresh=fresh)
    return finished.run_dir


def _overrides(overrides: Any) -> list[str]:
    """``overrides`` as a list of ``KEY=VALUE`` strings; anything else (a string, whose letters would
    be taken one by one, a dict, ...) is refused naming the argument."""
    from srde_core.errors import UsageError

    items = None
    if not isinstance(overrides, (str, bytes, Mapping)):
        try:
            items = list(overrides)
        except TypeError:
            pass
    if items is None or not all(isinstance(item, str) for item in items):
        raise UsageError(f"overrides: expected a list of 'KEY=VALUE' strings (as --set takes), got "
                         f"{type(overrides).__name__} {overrides!r:.60}")
    return items


def load(run_dir: str | Path, *, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a finished run: the HF model with its trained experts attached (in
    eval mode, experts on; the handle is :func:`experts_of`), and the run's tokenizer."""
    from srde_core.run import open_finished_run

    finished = open_finished_run(run_dir, _quiet_console(), device=device)
    model = finished.model
    if finished.experts is not None:
        object.__setattr__(model, EXPERTS_ATTRIBUTE, finished.experts)
    return model, finished.tokenizer


def attach(model: Any, srde: str | Path | Mapping[str, Any], *, seed: int = 0, plugins: Any = None) -> Any:
    """Freeze ``model`` (an HF causal LM) and attach experts; return the handle
    (:class:`srde_core.model.attach.SRDEModel`: trainable parameters, adapter state, ...).

    ``srde`` is a recipe (file or ``srde:NAME``: its ``[srde]`` table and seed are used) or the
    ``[srde]`` table itself as a dict (``{"layout": ..., "delta": ...}``; defaults as in a recipe).
    """
    from srde_core.model.build import attach_recipe_experts
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe
    from srde_core.recipe.layers import Layers
    from srde_core.recipe.resolve import resolve

    plugins = plugins if plugins is not None else load_plugins()
    if isinstance(srde, Mapping):
        layers = Layers(Path("<python>"))
        layers.merge({"name": "attached", "seed": seed, "data": {"generate": {}}, "srde": dict(srde),
                      "phases": [{"name": "experts", "trainer": "joint", "steps": 1}]}, "<python>")
        recipe = resolve(layers, plugins)
    else:
        recipe = load_recipe(srde, plugins)
    experts = attach_recipe_experts(model, recipe)
    object.__setattr__(model, EXPERTS_ATTRIBUTE, experts)
    return experts


def experts_of(model: Any) -> Any:
    """The SRDE handle of a model returned by :func:`load` or given to :func:`attach` (None if none)."""
    return getattr(model, EXPERTS_ATTRIBUTE, None)


@contextlib.contextmanager
def experts_off(model: Any) -> Iterator[Any]:
    """Inside the block the model computes its base function (every expert off); restored after."""
    experts = experts_of(model)
    if experts is None:
        yield model
        return
    layers = list(experts.layers.values())
    before = [layer.enabled for layer in layers]
    experts.set_enabled(False)
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.enabled = enabled


def generate(run_dir: str | Path, prompt: str, *, max_new_tokens: int = 32, experts: bool = True) -> str:
    """The greedy continuation of ``prompt`` by a finished run (``srde generate``)."""
    from srde_core.evaluate.generation import generate_from_run

    return generate_from_run(run_dir, prompt, max_new_tokens=max_new_tokens, experts=experts)
