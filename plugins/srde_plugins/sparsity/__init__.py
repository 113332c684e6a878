"""Adaptive sparsity: the experts' density follows a schedule (by default adaptive to the loss trend).

    [plugins.adaptive_sparsity]
    enabled = true
    density = { name = "adaptive", start = 0.05, end = 0.01, steps = 300, patience = 10 }

Any delta whose banks have a density works (``DeltaBank.density()``: the built-in ``sparse``, or a
third-party sparse delta). The banks are built at their density (which must be at least the
schedule's start, e.g. ``srde.delta.density = 0.05``) and, after every optimiser step of a phase
that trains experts, each uses the fraction ``density(t) / bank.density()`` of its entries: the
entries of largest ``importance * |value|`` (``DeltaBank.set_active_fraction``); the masked ones
(``DeltaBank.active_mask``) keep their values, and ``density_in_use`` counts ``active_entries``. With ``prune = true`` the banks drop the
inactive entries for good once the schedule reaches its end, so the kernels do less work from then on
(optimiser state follows the entries that stay). The schedule's state is checkpointed: resume is exact.
"""

from __future__ import annotations

from pydantic import Field

from srde_core.errors import RecipeError
from srde_core.hookspecs import hookimpl
from srde_core.params import Params, component
from srde_core.registry import ComponentChoice


class AdaptiveSparsityParams(Params):
    enabled: bool = Field(False, description="turn adaptive sparsity on")
    density: ComponentChoice = component(
        "schedule", {"name": "adaptive", "start": 0.05, "end": 0.01, "steps": 300},
        "the density over training (a scalar schedule; the default adapts its warm-up to the loss trend)",
    )
    prune: bool = Field(True, description="drop the inactive entries for good once the schedule has reached its end")
    phases: list[str] = Field(default_factory=list, description="phases it acts in (empty: every phase that trains experts)")


@hookimpl
def srde_register(registry):
    registry.settings("adaptive_sparsity", AdaptiveSparsityParams,
                      "Experts' density over training: adaptive warm-up, importance-ranked masking, pruning.")


def _controller(run):
    from srde_plugins.sparsity.controller import controller_of

    return controller_of(run)


@hookimpl
def srde_run_header(recipe):
    settings = recipe.settings("adaptive_sparsity")
    if not settings.enabled:
        return None
    check_schedule(recipe, settings)
    for choice in recipe.srde.delta.nested():
        if choice.kind == "selector" and getattr(choice.build(), "moves_entries", False):
            raise RecipeError(
                f"adaptive sparsity and selector '{choice.name}' would both decide which entries each expert "
                "keeps; use one of them",
                source=str(recipe.path), key="plugins.adaptive_sparsity",
            )
    return [f"adaptive sparsity: density {settings.density.name} schedule, prune {'on' if settings.prune else 'off'}"]


def check_schedule(recipe, settings) -> None:
    """The banks are built at ``srde.delta.density`` and can only keep fewer entries: a schedule
    that starts or ends above it would log a density the experts never have. Checked from the
    recipe, before any bank is built, for a delta whose params name a ``density`` (a delta without
    one is held to the banks' own ``density()`` only when they keep entries: a fraction above 1 is
    capped)."""
    built = getattr(recipe.srde.delta.params, "density", None)
    params = settings.density.params
    for key in ("start", "end", "value"):
        value = getattr(params, key, None)
        if isinstance(built, float) and isinstance(value, (int, float)) and value > built + 1e-12:
            raise RecipeError(
                f"the density schedule's {key} {value} is above srde.delta.density = {built}, the density the banks "
                f"are built at (they can only keep fewer entries); set srde.delta.density = {value} or lower the {key}",
                source=str(recipe.path), key=f"plugins.adaptive_sparsity.density.{key}",
            )


@hookimpl
def srde_before_phase(phase, run):
    controller = _controller(run)
    if controller is not None:
        controller.before_phase(phase)


@hookimpl
def srde_after_step(phase, run, step, metrics):
    controller = _controller(run)
    if controller is not None:
        controller.after_step(phase, step, metrics)


@hookimpl
def srde_checkpoint_saving(state, run):
    controller = _controller(run)
    if controller is not None:
        state["plugins"]["adaptive_sparsity"] = controller.state_dict()


@hookimpl
def srde_checkpoint_loaded(state, run):
    controller = _controller(run)
    if controller is not None and "adaptive_sparsity" in state.get("plugins", {}):
        controller.load_state_dict(state["plugins"]["adaptive_sparsity"])
