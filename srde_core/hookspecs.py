"""The hooks SRDE calls (pluggy project name ``srde``).

A plugin is any module or object with functions decorated ``@srde_core.hookimpl`` whose names are
listed here; it is found through the entry-point group ``srde`` (built-ins included). A hook
implementation may accept any subset of the arguments below. Unless a hook says *firstresult*,
every implementation is called and the results are collected in a list.

Components that a run *picks by name* (an engine, a sampler, a router, a reward model) are
registered in the registries (``srde_register``) and chosen in the recipe; a plugin can declare
new kinds of them (``srde_add_kinds``). Every other hook is for cross-cutting features that change
a run: flash attention, torch.compile, data caching, logging, adaptive schedules.

The ``run`` argument is the :class:`srde_core.run.RunContext` of the run in progress: ``run.recipe``
(the resolved, frozen recipe), ``run.settings(name)`` (this plugin's ``[plugins.NAME]`` table),
``run.run_dir``, ``run.dist`` (rank, world size, main process), ``run.device``, ``run.engine``,
``run.model``, ``run.experts``, ``run.tokenizer``, ``run.data`` and ``run.log(...)``.
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # annotations only: importing this module stays free of torch
    from srde_core.data.dataset import DataBundle
    from srde_core.model.context import ForwardContext
    from srde_core.recipe.resolve import Phase, Recipe
    from srde_core.registry import KindRegistrar, ProviderRegistrar
    from srde_core.run import RunContext

hookspec = pluggy.HookspecMarker("srde")
hookimpl = pluggy.HookimplMarker("srde")


@hookspec
def srde_add_kinds(kinds: KindRegistrar) -> None:
    """Declare new component kinds (the analogue of ``pytest_addhooks``).

    Called once per process, at start-up, for every plugin before any ``srde_register``.
    ``kinds.add(name, summary, contract=...)``: ``contract`` is the class (or a lazy
    ``"module:attr"`` reference to it) every component of the kind must be an instance of. A
    component kind is then used from params: ``verifier: ComponentChoice = component("verifier")``.
    """


@hookspec
def srde_register(registry: ProviderRegistrar) -> None:
    """Add components to the registries. Called once per process, at start-up.

    :param registry: a :class:`srde_core.registry.ProviderRegistrar` bound to this plugin's name:
        ``registry.add(kind, name, factory, params, summary)``, ``@registry.component(...)`` and
        ``registry.settings(name, params, summary)`` for a ``[plugins.NAME]`` recipe table.
    Nothing is returned. A plugin whose registration raises is reported as broken and none of its
    components are registered.
    """


@hookspec
def srde_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add commands to the ``srde`` command line (``srde lm-eval`` is the tracking plugin's).

    Called when the command line builds its parser, before it reads the arguments. ``subparsers.add_parser(name,
    help=...)`` returns a parser whose mistakes are one line (exit status 2);
    ``parser.set_defaults(func=handler)``: ``handler(args)`` returns the exit status and raises an
    SRDEError (a UsageError for a bad argument) for one line. Import nothing heavy here (``srde
    --help`` does not import torch). Return None.
    """


@hookspec
def srde_run_header(recipe: Recipe) -> list[str] | None:
    """Lines for the run header, e.g. ``"attention: sdpa (flash-attn needs CUDA)"``.

    Called after the recipe is resolved, before any work, and by the recipe check (``srde
    validate``, and before a run's work): a pure function of the recipe, which may refuse it with a
    RecipeError. Return a list of strings or None.
    """


@hookspec
def srde_model_load_kwargs(recipe: Recipe) -> dict[str, Any] | None:
    """Extra keyword arguments for loading the base model (``from_pretrained`` / ``from_config``).

    Called before the base model is built (and by the recipe check, which builds it on the meta
    device: a pure function of the recipe). Return a dict or None; all dicts are merged, and two
    plugins setting one key to different values is an error. Flash attention uses this to set
    ``attn_implementation``.
    """


@hookspec
def srde_model_init_context(run: RunContext) -> AbstractContextManager | None:
    """A context manager to enter around the construction of the base model, or None.

    Called once per run, before the base model is built. Every returned context is entered (in plugin order) while the model is built; ZeRO-3 returns
    ``deepspeed.zero.Init`` here so parameters are partitioned as they are created. The core's
    own implementation returns the run engine's :meth:`~srde_core.train.engine.Engine.model_init_context`.
    """


@hookspec
def srde_configure_model(model: Any, run: RunContext) -> None:
    """Change the model in place once the base is frozen and the SRDE layers are attached.

    Called once per run, when the first phase that trains experts attaches them (after any dense
    base pre-training): torch.compile, activation checkpointing, ... Return None.
    """


@hookspec
def srde_prepare_data(data: DataBundle, run: RunContext) -> None:
    """Adjust the tokenised data before training (filtering, re-weighting, extra caching).

    Called once per run, after the data is loaded and tokenised (or read from the cache).

    :param data: a :class:`srde_core.data.DataBundle`; replace ``data.train`` / ``data.eval``
        (``datasets.Dataset`` objects) to change what the trainers see. Return None.
    """


@hookspec
def srde_forward_context(context: ForwardContext, batch: dict[str, Any], phase: Phase, run: RunContext) -> None:
    """Add per-token metadata to the :class:`~srde_core.model.context.ForwardContext` of a
    forward (a budget from a difficulty head, a forced assignment, ...).

    Called before every forward pass of a model with experts attached, in every mode
    (``context.mode``: ``"train"``, ``"eval"``, ``"generate"``), after the core filled
    ``input_ids``, ``attention_mask``, ``domain_ids`` and ``difficulty`` from ``batch``. ``phase``
    is the training phase, None outside training. During generation ``batch`` holds the ids of
    the tokens being processed (the new tokens, with the KV cache) and the attention mask, once per
    generated token. Change ``context`` in place; return None.
    """


@hookspec
def srde_before_phase(phase: Phase, run: RunContext) -> None:
    """Called before a phase's trainer runs. Return None."""


@hookspec
def srde_after_step(phase: Phase, run: RunContext, step: int, metrics: dict[str, Any]) -> None:
    """Called after each optimiser step with the metrics dict of that step (1-based ``step``).

    Plugins may add entries to ``metrics`` (written to ``metrics.jsonl`` with the step when it is
    logged: every ``log_every`` steps and the phase's last) or act on them (adaptive schedules,
    external loggers). Called on every process. Return None.
    """


@hookspec
def srde_after_phase(phase: Phase, run: RunContext, metrics: dict[str, Any]) -> None:
    """Called after a phase's trainer finished, with its final metrics. Return None."""


@hookspec
def srde_after_run(run: RunContext) -> None:
    """Called once when every phase has run and the adapter is written (close trackers, report).
    Return None."""


@hookspec
def srde_checkpoint_saving(state: dict[str, Any], run: RunContext) -> None:
    """Called before a checkpoint is written; add this plugin's state under ``state["plugins"]``.

    Everything in ``state`` must be picklable by ``torch.save``. Return None.
    """


@hookspec
def srde_checkpoint_loaded(state: dict[str, Any], run: RunContext) -> None:
    """Called after a checkpoint was read for ``--resume``; restore this plugin's state. Return None."""
