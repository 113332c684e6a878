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
from srde_core.train.trainer import BaseInfo, PhaseResult  # noqa: F401  (BaseInfo: part of this module's API)

T = TypeVar("T")

RECIPE_FILE = "recipe.json"
ADAPTER_FILE = "adapter.safetensors"
BASE_FILE = "base.json"


def run_directory(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


def check_run_directory(recipe: Recipe, *, resume: bool, fresh: bool, dist: Dist | None = None) -> Path:
    """Refuse early (before any work) what ``prepare_run_directory`` would refuse later: among it, a
    resume with another process count than the run's (each step's global batch, and so the result,
    would differ from the uninterrupted run's)."""
    run_dir = run_directory(recipe)
    dist = dist or Dist.from_env()
    saved = run_dir / RECIPE_FILE
    if resume:
        if not saved.is_file():
            raise SRDEError("no run to resume here (pass the recipe that started it)", source=str(run_dir))
        previous = read_run_json(saved)
        if previous.get("fingerprint") != recipe.fingerprint():
            raise SRDEError(
                "the recipe differs from the one this run started with; resume needs the same recipe "
                "and --set overrides (or use --fresh)",
                source=str(run_dir),
            )
        started = previous.get("processes")
        if started is not None and started != dist.world_size:
            batches = ", ".join(f"{p.name} {p.batch_size * p.grad_accum * started} -> "
                                f"{p.batch_size * p.grad_accum * dist.world_size}" for p in recipe.phases)
            raise SRDEError(
                f"the run started with {started} process{'es' if started != 1 else ''}, this resume has "
                f"{dist.world_size}: the global batch would change ({batches}); resume it with {started}",
                source=str(run_dir),
            )
    elif run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise SRDEError("is not a directory srde created (a link or a file); remove it yourself or choose "
                        "another name", source=str(run_dir))
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not fresh:
            raise SRDEError("run directory exists; pass --resume to continue it or --fresh to start over",
                            source=str(run_dir))
        if not (run_dir / RECIPE_FILE).is_file():
            raise SRDEError(f"not a run directory (no {RECIPE_FILE}), so --fresh does not delete it; remove it "
                            "yourself or choose another name", source=str(run_dir))
    return run_dir


def prepare_run_directory(recipe: Recipe, *, resume: bool, fresh: bool, inputs: dict[str, Any] | None = None) -> Path:
    """Create the run directory (emptied first with ``fresh``) and write the resolved recipe, with
    ``inputs`` (the fingerprints of the data and the tokenizer, the working directory).

    Called once the data and the model have loaded, so bad input leaves nothing behind.
    """
    run_dir = check_run_directory(recipe, resume=resume, fresh=fresh)
    if resume:
        remove_temporaries(run_dir)
        return run_dir
    if fresh and (run_dir / RECIPE_FILE).is_file():  # only a run directory, and only this child of output_dir
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / RECIPE_FILE,
        {"fingerprint": recipe.fingerprint(), "path": str(recipe.path), "base_dir": str(recipe.base_dir),
         "path_bases": dict(recipe.path_bases), "processes": Dist.from_env().world_size,
         "recipe": recipe.resolved, **(inputs or {})},
    )
    return run_dir


def remove_temporaries(run_dir: Path) -> None:
    """Remove what writes killed midway left in ``run_dir`` (``.NAME.tmp``, ``.NAME.XXXX.tmp``, a
    half-written checkpoint): the run directory is locked, so no live write owns them."""
    from srde_core.train.checkpoints import CheckpointStore

    for path in run_dir.glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
    CheckpointStore(run_dir / "checkpoints").remove_temporaries()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (strict: no NaN or Infinity) atomically; a file-system fault is one line naming it."""
    from srde_core.train.checkpoints import writing

    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with writing(path, cleanup=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def read_run_json(path: Path, *, keys: tuple[str, ...] = (), remedy: str = "start over with --fresh") -> dict[str, Any]:
    """A run directory's JSON file (``recipe.json``, ``base.json``) as a dict with ``keys``; a file
    that is empty, cut short or not an object ends in one line naming it (and ``remedy``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else ("empty" if not path.stat().st_size else f"not JSON: {err}")
        raise SRDEError(f"cannot be read ({reason}); the run directory is damaged ({remedy})", source=str(path)) from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if not isinstance(data, dict) or missing:
        what = f"has no '{missing[0]}'" if isinstance(data, dict) else "is not a JSON object"
        raise SRDEError(f"{what}; the run directory is damaged ({remedy})", source=str(path))
    return data


def input_fingerprints(run: RunContext) -> dict[str, str]:
    """What a run directory records of the run's inputs besides the recipe: the fingerprints of
    the tokenised data (sources' contents, tokenizer, seq_len, columns) and of the tokenizer."""
    return {"data_fingerprint": run.data.fingerprint, "tokenizer_fingerprint": run.tokenizer.fingerprint}


def check_run_inputs(run: RunContext, recorded: dict[str, Any], *, doing: str) -> None:
    """Refuse (one line) when the data or the tokenizer differ from those ``recorded`` in the run
    directory's recipe.json: a resumed run would go on training on other data, an eval would
    measure other data. Runs that predate the record are not checked."""
    for key, what in (("tokenizer_fingerprint", "tokenizer"), ("data_fingerprint", "data")):
        before = recorded.get(key)
        now = input_fingerprints(run)[key]
        if before and before != now:
            raise SRDEError(
                f"the {what} changed since the run started ({key.replace('_', ' ')} {before[-12:]}, now {now[-12:]}); "
                f"{doing}",
                source=str(run.run_dir),
            )


def resumed_on_the_same_data(run: RunContext) -> bool:
    """Whether the run directory records the data and tokenizer this (resumed) run loaded."""
    try:
        recorded = read_run_json(run.run_dir / RECIPE_FILE)
    except SRDEError:
        return False
    return all(recorded.get(key) == value for key, value in input_fingerprints(run).items())


def check_writable(recipe: Recipe) -> None:
    """``output_dir`` and ``cache_dir`` can be created and written (checked before any work, and
    without creating anything): the nearest existing ancestor of each is a writable directory."""
    for key in ("output_dir", "cache_dir"):
        path = Path(getattr(recipe, key)).expanduser()
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problem = "is a file" if existing == path else f"is under '{existing}', which is a file"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = "is not writable" if existing == path else f"cannot be created: '{existing}' is not writable"
        elif (refused := _refuses_files(existing)) is not None:  # root passes os.access on /proc, a read-only mount
            problem = (f"is not writable ({refused})" if existing == path
                       else f"cannot be created: '{existing}' takes no new files ({refused})")
        else:
            continue
        raise SRDEError(f"'{path}' {problem}", source=str(recipe.path), key=key)


def _refuses_files(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (a temporary one is tried, and is gone after)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


class RunLock:
    """An exclusive lock on a run directory: ``fcntl.flock`` on ``.NAME.lock`` beside it (inside,
    ``--fresh`` would delete it), held by the main process for the run's life. The kernel releases
    it when the process ends however it ends, so a lock left by a killed run is simply free; the
    file is removed on release (re-checked on acquire, so a removed file is never locked twice)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir.with_name(f".{run_dir.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        if self.fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                pid = f" (pid {holder})" if holder.isdigit() else ""
                raise SRDEError(
                    f"another srde process{pid} is running in this run directory; wait for it to end or stop it",
                    source=str(self.run_dir),
                ) from None
            except OSError:  # a file system without locks (some network mounts): run unlocked
                os.close(fd)
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the lock
        self.fd = None


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
    finished context.

    The main process holds the run directory's :class:`RunLock` for the run's life: from the start
    when the directory exists (``--resume``, ``--fresh``), else from when it creates it.
    """
    from srde_core.recipe.check import check_recipe

    dist = Dist.from_env()
    check_recipe(recipe, plugins)  # what the recipe decides, before anything loads or is created
    run_dir = check_run_directory(recipe, resume=resume, fresh=fresh, dist=dist)
    check_writable(recipe)
    lock = RunLock(run_dir) if dist.is_main else None
    try:
        if lock is not None and run_dir.exists():
            lock.acquire()
        return _execute(recipe, plugins, console, resume=resume, fresh=fresh, dist=dist, run_dir=run_dir, lock=lock)
    finally:
        if lock is not None:
            lock.release()


def _execute(recipe: Recipe, plugins: PluginSet, console, *, resume: bool, fresh: bool, dist: Dist, run_dir: Path,
             lock: RunLock | None) -> RunContext:
    from srde_core.data.loading import check_batch_sizes, load_run_data
    from srde_core.model.build import build_base_model
    from srde_core.train.checkpoints import CheckpointStore
    from srde_core.train.metrics import MetricsLog

    seed_everything(recipe.seed)
    run = RunContext(recipe, plugins, run_dir, pick_device(recipe.device, dist), console, dist=dist, resume=resume)
    run.engine = recipe.engine.build()
    trainers = build_components(recipe)  # a factory that fails does so before any data or model loads
    run.device = run.engine.setup(run)
    print_header(run)
    run.tokenizer, run.data = load_run_data(run)
    if resume:
        check_run_inputs(run, read_run_json(run_dir / RECIPE_FILE),
                         doing="resuming would go on training on other data; restore it or start over with --fresh")
    run.hook.srde_prepare_data(data=run.data, run=run)
    check_batch_sizes(run)
    run.model = build_base_model(run)
    run.base = BaseInfo(default_base_id(recipe))
    if dist.is_main:
        lock.acquire()  # a new run directory: taken before it is created
        prepare_run_directory(recipe, resume=resume, fresh=fresh, inputs={
            **input_fingerprints(run), "cwd": os.getcwd(), "columns_explicit": sorted(recipe.data.columns.model_fields_set)})
        run.metrics = MetricsLog(run_dir / "metrics.jsonl")
    dist.barrier()
    run.checkpoints = CheckpointStore(run_dir / "checkpoints")
    for phase in recipe.phases:
        trainer = trainers[phase.index]
        run.hook.srde_before_phase(phase=phase, run=run)
        outcome = PhaseResult.of(trainer.run(run, phase))
        if outcome.base is not None:  # the phase trained or replaced the base weights
            run.base = outcome.base
        run.hook.srde_after_phase(phase=phase, run=run, metrics=outcome.metrics)
    if dist.is_main:
        write_json_atomic(run_dir / BASE_FILE, {"id": run.base.id, "weights": run.base.weights,
                                                "adapter": run.experts is not None})
    if run.experts is not None:
        from srde_core.model.adapters import save_adapter

        with run.engine.full_state(run.experts.adapter) as state:
            check_finite_state(state, run, "adapter")
            if dist.is_main:
                save_adapter(run_dir / ADAPTER_FILE, run.experts, base_model_id=run.base.id,
                             recipe_hash=recipe.fingerprint(), state=state)
        run.log(f"adapter: {run_dir / ADAPTER_FILE}")
    run.hook.srde_after_run(run=run)
    dist.barrier()
    return run


def build_components(recipe: Recipe) -> list[Any]:
    """Each phase's trainer (returned, in phase order), and a trial build of the components built
    later in the run (samplers, losses and their weights, LR schedules, the SRDE components), so
    that a plugin factory that fails does so before any data or model loads."""
    from srde_core.train.checkpoints import restore_rng, rng_state

    trainers = [phase.trainer.build() for phase in recipe.phases]
    before = rng_state()  # a trial build must not move the random streams the run is seeded with
    try:
        for phase in recipe.phases:
            phase.sampler.build()
            phase.scheduler.build(total_steps=phase.steps)
            for loss in phase.losses:
                loss.build()
                if hasattr(loss.weight, "build"):
                    loss.weight.build()
        for choice in (recipe.srde.layout, recipe.srde.delta, recipe.srde.router, recipe.srde.combine):
            choice.build()
    finally:
        restore_rng(before)
    return trainers


def _explicit_columns(data: dict[str, Any], explicit: list[str] | None) -> dict[str, Any]:
    """``[data.columns]`` as the recipe wrote it: the resolved form names every column, but a
    column the recipe left at its default is optional (``domain``, ``difficulty``), and that is
    what a rebuilt recipe must read (runs that predate the record: the columns not at their default)."""
    from srde_core.data.params import ColumnsParams

    columns = data.get("columns")
    if isinstance(columns, dict):
        fields = ColumnsParams.model_fields
        keep = set(explicit) if explicit is not None else {
            k for k, v in columns.items() if k not in fields or v != fields[k].default}
        data["columns"] = {k: v for k, v in columns.items() if k in keep}
    return data


def check_finite_state(state: dict[str, Any], run: RunContext, what: str) -> None:
    """Never write NaN or infinite weights: one line naming the first such tensor."""
    import torch

    broken = [name for name, value in state.items() if torch.is_tensor(value) and value.is_floating_point()
              and not bool(torch.isfinite(value).all())]
    if broken:
        raise SRDEError(f"the trained {what} holds non-finite values ({broken[0]}"
                        f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); not written",
                        source=str(run.run_dir))


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


def open_finished_run(run_dir: str | Path, console, *, device: str | None = None, experts: bool = True,
                      check_data: bool = False) -> RunContext:
    """Rebuild a finished run's model (base weights + experts from the adapter) for eval/generation.

    Relative data paths resolve against the directory they were resolved against when the run
    started (and a relative ``cache_dir`` against the run's working directory, where it still
    exists). A tokenizer that changed since then (and with ``check_data``, data that changed), or a
    missing adapter of a run that trained experts, end in one line (``experts=False``: the caller
    uses the base alone and needs no adapter).
    """
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
    stored = read_run_json(saved, keys=("recipe", "path"))
    base = read_run_json(base_file, keys=("id",), remedy=f"srde run {stored['path']} --resume writes it again")
    resolved = dict(stored["recipe"])
    started_in = stored.get("cwd")
    cache_dir = Path(str(resolved.get("cache_dir", "")))
    if started_in and resolved.get("cache_dir") and not cache_dir.is_absolute() and Path(started_in).is_dir():
        resolved["cache_dir"] = str(Path(started_in) / cache_dir)
    resolved["data"] = _explicit_columns(dict(resolved.get("data") or {}), stored.get("columns_explicit"))
    plugins = load_plugins()
    recipe = recipe_from_resolved(resolved, stored["path"], plugins, stored.get("base_dir"), stored.get("path_bases"))
    adapter = run_dir / ADAPTER_FILE
    trained_experts = base.get("adapter", any(p.trainer.name != "base_pretrain" for p in recipe.phases))
    if experts and trained_experts and not adapter.is_file():
        raise SRDEError(f"{ADAPTER_FILE} is missing, but the run trained experts; write it again with "
                        f"srde run {stored['path']} --resume", source=str(run_dir))
    run = RunContext(recipe, plugins, run_dir, pick_device(device or recipe.device), console)
    seed_everything(recipe.seed)
    run.tokenizer, run.data = load_run_data(run)
    check_run_inputs(run, stored if check_data else {k: v for k, v in stored.items() if k != "data_fingerprint"},
                     doing="the eval would measure other data than the run's; restore it or run the recipe again"
                     if check_data else "the run's model reads other token ids; restore it")
    run.model = build_base_model(run)
    if base.get("weights"):
        weights = Path(base["weights"])
        if not weights.is_file():
            raise SRDEError(f"base weights {weights} are gone (cache cleared?); re-run the recipe", source=str(run_dir))
        run.model.load_state_dict(load_file(weights, device=str(run.device)))
    run.base = BaseInfo(base["id"], base.get("weights"))
    if adapter.is_file():
        handle = run.attach_experts()
        load_adapter(adapter, handle, base_model_id=base["id"], recipe_hash=stored.get("fingerprint"))
    run.model.eval()
    return run
