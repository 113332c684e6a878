"""Running a recipe: the run directory, the run context handed to trainers and hooks, the phases.

    srde run recipe.toml                      (one process, or each process under torchrun)
      -> recipe resolved and validated (before any work)
      -> engine built and set up (processes joined, device chosen)
      -> tokenizer, data (cached), base model (hooks may change load kwargs and wrap construction)
      -> run directory (main process): resolved recipe, metrics.jsonl, checkpoints/, adapter at the end
      -> each phase: phase.trainer.build().run(run, phase)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from srde_core.dist import SINGLE, Dist
from srde_core.errors import SRDEError
from srde_core.plugins import PluginSet
from srde_core.recipe.resolve import Recipe

T = TypeVar("T")

RECIPE_FILE = "recipe.json"
ADAPTER_FILE = "adapter.safetensors"
BASE_FILE = "base.json"


def run_directory(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


def check_run_directory(recipe: Recipe, *, resume: bool, fresh: bool) -> Path:
    """Refuse early (before any work) what ``prepare_run_directory`` would refuse later."""
    run_dir = run_directory(recipe)
    saved = run_dir / RECIPE_FILE
    if resume:
        if not saved.is_file():
            raise SRDEError("no run to resume here (pass the recipe that started it)", source=str(run_dir))
        previous = json.loads(saved.read_text())
        if previous.get("fingerprint") != recipe.fingerprint():
            raise SRDEError(
                "the recipe differs from the one this run started with; resume needs the same recipe "
                "and --set overrides (or use --fresh)",
                source=str(run_dir),
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not fresh:
        raise SRDEError("run directory exists; pass --resume to continue it or --fresh to start over", source=str(run_dir))
    return run_dir


def prepare_run_directory(recipe: Recipe, *, resume: bool, fresh: bool) -> Path:
    """Create the run directory (emptied first with ``fresh``) and write the resolved recipe.

    Called once the data and the model have loaded, so bad input leaves nothing behind.
    """
    run_dir = check_run_directory(recipe, resume=resume, fresh=fresh)
    if resume:
        return run_dir
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / RECIPE_FILE,
        {"fingerprint": recipe.fingerprint(), "path": str(recipe.path), "base_dir": str(recipe.base_dir), "recipe": recipe.resolved},
    )
    return run_dir


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(choice: str, dist: Dist = SINGLE):
    """The device of this process: ``cuda:<local rank>`` on GPUs, else ``cpu``."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SRDEError("device 'cuda' requested but CUDA is not available on this machine", key="device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device(choice)


@dataclass
class BaseInfo:
    """The base weights a run's experts train on: an id (checked when an adapter loads) and, for a
    base trained by the run itself, the file holding its weights."""

    id: str
    weights: str | None = None


@dataclass(eq=False)
class RunContext:
    """Everything a trainer or hook needs about the run in progress (compared by identity)."""

    recipe: Recipe
    plugins: PluginSet
    run_dir: Path
    device: Any
    console: Any
    dist: Dist = SINGLE
    resume: bool = False
    engine: Any = None  # the run's srde_core.train.engine.Engine
    tokenizer: Any = None
    data: Any = None  # srde_core.data.dataset.DataBundle
    model: Any = None
    experts: Any = None  # the attached srde_core.model.attach.SRDEModel, once a phase asked for experts
    metrics: Any = None  # srde_core.train.metrics.MetricsLog (main process only)
    checkpoints: Any = None  # srde_core.train.checkpoints.CheckpointStore
    base: BaseInfo = field(default_factory=lambda: BaseInfo(""))
    _plugin_states: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def hook(self):
        return self.plugins.hook

    def settings(self, name: str):
        return self.recipe.settings(name)

    def log(self, message: str, *, markup: bool = False) -> None:
        """Print on the main process (other processes stay quiet)."""
        if self.dist.is_main:
            self.console.print(message, highlight=False, markup=markup)

    def plugin_state(self, name: str, make: Callable[[], T]) -> T:
        """This run's private state of plugin ``name`` (a tracker's writer, a controller), made by
        ``make()`` on first use. For the plugin's own use: plugins exchange nothing through it."""
        if name not in self._plugin_states:
            self._plugin_states[name] = make()
        return self._plugin_states[name]

    def attach_experts(self):
        """Freeze the base and attach the recipe's SRDE layers (once); return the handle."""
        if self.experts is None:
            from srde_core.model.build import attach_from_recipe

            self.experts = attach_from_recipe(self)
        return self.experts


def execute(recipe: Recipe, plugins: PluginSet, console, *, resume: bool = False, fresh: bool = False) -> RunContext:
    """Run every phase of ``recipe`` in this process (one of several under torchrun); return the
    finished context."""
    from srde_core.data.loading import load_run_data
    from srde_core.model.build import build_base_model
    from srde_core.train.checkpoints import CheckpointStore
    from srde_core.train.metrics import MetricsLog

    dist = Dist.from_env()
    run_dir = check_run_directory(recipe, resume=resume, fresh=fresh)
    seed_everything(recipe.seed)
    run = RunContext(recipe, plugins, run_dir, pick_device(recipe.device, dist), console, dist=dist, resume=resume)
    run.engine = recipe.engine.build()
    run.device = run.engine.setup(run)
    print_header(run)
    run.tokenizer, run.data = load_run_data(run)
    run.hook.srde_prepare_data(data=run.data, run=run)
    run.model = build_base_model(run)
    run.base = BaseInfo(default_base_id(recipe))
    if dist.is_main:
        prepare_run_directory(recipe, resume=resume, fresh=fresh)
        run.metrics = MetricsLog(run_dir / "metrics.jsonl")
    dist.barrier()
    run.checkpoints = CheckpointStore(run_dir / "checkpoints")
    for phase in recipe.phases:
        trainer = phase.trainer.build()
        run.hook.srde_before_phase(phase=phase, run=run)
        result = trainer.run(run, phase) or {}
        run.hook.srde_after_phase(phase=phase, run=run, metrics=result)
    if dist.is_main:
        write_json_atomic(run_dir / BASE_FILE, {"id": run.base.id, "weights": run.base.weights})
    if run.experts is not None:
        from srde_core.model.adapters import save_adapter

        with run.engine.full_state(run.experts.adapter) as state:
            if dist.is_main:
                save_adapter(run_dir / ADAPTER_FILE, run.experts, base_model_id=run.base.id,
                             recipe_hash=recipe.fingerprint(), state=state)
        run.log(f"adapter: {run_dir / ADAPTER_FILE}")
    run.hook.srde_after_run(run=run)
    dist.barrier()
    return run


def default_base_id(recipe: Recipe) -> str:
    """Identifies the base weights the experts train on (adapters check it on load); a phase that
    trains the base replaces it."""
    model = recipe.model
    return model.name_or_path or f"{model.architecture}:from-config"


def print_header(run: RunContext) -> None:
    recipe = run.recipe
    healthy = [p.name for p in run.plugins.plugins if not p.error]
    lines = [
        f"[bold]srde run[/] {recipe.path}  ->  {run.run_dir}",
        f"model: {recipe.model.name_or_path or recipe.model.architecture + ' (from config)'}  "
        f"dtype {recipe.model.dtype}  device {run.device}",
        f"engine: {recipe.engine.name}  processes {run.dist.world_size}",
        "phases: " + ", ".join(f"{p.name} [{p.trainer.name}, {p.steps} steps]" for p in recipe.phases),
        f"experts: {recipe.srde.delta.name} deltas via {recipe.srde.layout.name} layout on {', '.join(recipe.srde.projections)}; "
        f"router {recipe.srde.router.name}, combine {recipe.srde.combine.name}",
        f"plugins: {', '.join(healthy)}",
    ]
    for extra in run.hook.srde_run_header(recipe=recipe):
        lines.extend(extra or [])
    for broken in run.plugins.broken:
        lines.append(f"warning: plugin '{broken.name}' failed to load: {broken.error}")
    run.log(lines[0], markup=True)
    for line in lines[1:]:
        run.log(line)


def open_finished_run(run_dir: str | Path, console, *, device: str | None = None) -> RunContext:
    """Rebuild a finished run's model (base weights + experts from the adapter) for eval/generation."""
    from safetensors.torch import load_file

    from srde_core.data.loading import load_run_data
    from srde_core.model.adapters import load_adapter
    from srde_core.model.build import build_base_model
    from srde_core.plugins import load_plugins
    from srde_core.recipe.resolve import recipe_from_resolved

    run_dir = Path(run_dir)
    saved, base_file = run_dir / RECIPE_FILE, run_dir / BASE_FILE
    if not saved.is_file():
        raise SRDEError("not a run directory (no recipe.json)", source=str(run_dir))
    if not base_file.is_file():
        raise SRDEError("the run has not finished (no base.json); finish it with srde run --resume", source=str(run_dir))
    stored = json.loads(saved.read_text())
    plugins = load_plugins()
    recipe = recipe_from_resolved(stored["recipe"], stored["path"], plugins, stored.get("base_dir"))
    run = RunContext(recipe, plugins, run_dir, pick_device(device or recipe.device), console)
    seed_everything(recipe.seed)
    run.tokenizer, run.data = load_run_data(run)
    run.model = build_base_model(run)
    base = json.loads(base_file.read_text())
    if base.get("weights"):
        weights = Path(base["weights"])
        if not weights.is_file():
            raise SRDEError(f"base weights {weights} are gone (cache cleared?); re-run the recipe", source=str(run_dir))
        run.model.load_state_dict(load_file(weights, device=str(run.device)))
    run.base = BaseInfo(base["id"], base.get("weights"))
    adapter = run_dir / ADAPTER_FILE
    if adapter.is_file():
        experts = run.attach_experts()
        load_adapter(adapter, experts, base_model_id=base["id"])
    run.model.eval()
    return run
