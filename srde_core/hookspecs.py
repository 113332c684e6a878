"""The hooks SRDE calls (pluggy project name ``srde``).

A plugin is any module or object with functions decorated ``@srde_core.hookimpl`` whose names are
listed here; it is found through the entry-point group ``srde`` (built-ins included). A hook
implementation may accept any subset of the arguments below. Unless a hook says *firstresult*,
every implementation is called and the results are collected in a list.

Registries are for components that a recipe picks by name (``srde_register``). Every other hook is
for cross-cutting features that change a run: flash attention, torch.compile, DeepSpeed, data
caching, curriculum order, logging, adaptive schedules.

The ``run`` argument is the :class:`srde_core.run.RunContext` of the run in progress: ``run.recipe``
(the resolved, frozen recipe), ``run.settings(name)`` (this plugin's ``[plugins.NAME]`` table),
``run.run_dir``, ``run.device``, ``run.model``, ``run.tokenizer``, ``run.data`` and ``run.log(...)``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("srde")
hookimpl = pluggy.HookimplMarker("srde")


@hookspec
def srde_register(registry):
    """Add components to the registries. Called once per process, at start-up.

    :param registry: a :class:`srde_core.registry.ProviderRegistrar` bound to this plugin's name:
        ``registry.add(kind, name, factory, params, summary)``, ``@registry.component(...)`` and
        ``registry.settings(name, params, summary)`` for a ``[plugins.NAME]`` recipe table.
    Nothing is returned. A plugin whose registration raises is reported as broken and none of its
    components are registered.
    """


@hookspec
def srde_run_header(recipe):
    """Lines for the run header, e.g. ``"attention: sdpa (flash-attn needs CUDA)"``.

    Called after the recipe is resolved, before any work. Return a list of strings or None.
    """


@hookspec
def srde_model_load_kwargs(recipe):
    """Extra keyword arguments for loading the base model (``from_pretrained`` / ``from_config``).

    Called before the base model is built. Return a dict or None; all dicts are merged, and two
    plugins setting one key to different values is an error. Flash attention uses this to set
    ``attn_implementation``.
    """


@hookspec
def srde_configure_model(model, run):
    """Change the model in place once the base is frozen and the SRDE layers are attached.

    Called once per run, when the first phase that trains experts attaches them (after any dense
    base pre-training): torch.compile, activation checkpointing, ... Return None.
    """


@hookspec
def srde_prepare_data(data, run):
    """Adjust the tokenised data before training (filtering, re-weighting, extra caching).

    Called once per run, after the data is loaded and tokenised (or read from the cache).

    :param data: a :class:`srde_core.data.DataBundle`; replace ``data.train`` / ``data.eval``
        (``datasets.Dataset`` objects) to change what the trainers see. Return None.
    """


@hookspec(firstresult=True)
def srde_batch_indices(dataset, phase, step, batch_size, seed):
    """The example indices of micro-batch number ``step`` of a phase (curriculum order, ...).

    Called before every micro-batch of every phase. *firstresult*: the first non-None list wins; the core's default is a reshuffled-per-epoch
    permutation. It must be a pure function of its arguments: resuming a run replays it from the
    saved step, which is what makes resumption exact.
    """


@hookspec(firstresult=True)
def srde_training_engine(model, parameters, phase, run):
    """The engine that owns backward, clipping, the optimiser step and mixed precision.

    Called once at the start of every training phase. *firstresult*: the first non-None engine wins; the core's default is
    :class:`srde_core.engine.TorchEngine`. DeepSpeed ZeRO returns its own engine here. The engine
    must provide the methods of :class:`srde_core.engine.Engine`.
    """


@hookspec
def srde_before_phase(phase, run):
    """Called before a phase's trainer runs. Return None."""


@hookspec
def srde_after_step(phase, run, step, metrics):
    """Called after each optimiser step with the metrics dict of that step.

    Plugins may add entries to ``metrics`` (they are logged) or act on them (adaptive schedules,
    external loggers). Return None.
    """


@hookspec
def srde_after_phase(phase, run, metrics):
    """Called after a phase's trainer finished, with its final metrics. Return None."""


@hookspec
def srde_checkpoint_saving(state, run):
    """Called before a checkpoint is written; add this plugin's state under ``state["plugins"]``.

    Everything in ``state`` must be picklable by ``torch.save``. Return None.
    """


@hookspec
def srde_checkpoint_loaded(state, run):
    """Called after a checkpoint was read for ``--resume``; restore this plugin's state. Return None."""
