"""torch.compile: each decoder layer compiled on its own (regional compilation), in every phase or the chosen ones.

    [plugins.compile]
    enabled = true
    mode = "default"          # or "reduce-overhead" (CUDA graphs), "max-autotune"
    # dynamic = true          # true / false; unset: torch decides (static first, dynamic after a shape change)
    fullgraph = false         # true: a graph break is an error
    backend = "inductor"      # any torch._dynamo backend ("aot_eager": no code generation)
    phases = []               # the phases to compile (names); empty: every phase

Before a chosen phase runs, the forward of every decoder layer of the language model is compiled
(the dense base pre-training too); when the experts are attached, the layers are compiled again, so
the graphs are those of the layers being trained. Delta banks that do not trace
(``DeltaBank.compile_traceable`` false, e.g. the sparse CSR kernels) run eagerly inside the compiled
layer: one graph break each (``fullgraph = true`` with such banks stops, in one line, when the
experts attach). A phase not chosen runs the layers eagerly. Dynamo's recompile limits are raised
to 8 per decoder layer (the layers share one code object; see :mod:`.regional`).

A backend that cannot run on this machine (an unknown name, inductor without a C++ compiler on CPU
or without Triton on CUDA, a ``mode`` with a backend other than inductor) stops the run before any
work, in one line naming the key: the run is not silently slower than the recipe says.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import Params

NAME = "compile"


class CompileParams(Params):
    enabled: bool = Field(False, description="compile every decoder layer with torch.compile")
    mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode (reduce-overhead: CUDA graphs; max-autotune: kernel search)"
    )
    dynamic: bool | None = Field(
        None, description="dynamic shapes: true / false; unset: static first, dynamic after a shape change"
    )
    fullgraph: bool = Field(False, description="make a graph break an error")
    backend: str = Field("inductor", min_length=1, description="the torch._dynamo backend")
    phases: list[str] = Field(default_factory=list, description="phases to compile (names; empty: every phase)")


def _settings(recipe) -> CompileParams:
    return recipe.settings(NAME)


def _chosen(settings: CompileParams, phase_name: str) -> bool:
    return not settings.phases or phase_name in settings.phases


@hookimpl
def srde_register(registry):
    registry.settings(NAME, CompileParams, "torch.compile of each decoder layer (regional), in the chosen phases.")


@hookimpl
def srde_run_header(recipe):
    settings = _settings(recipe)
    if not settings.enabled:
        return None
    from srde_plugins.compile.regional import check_settings, describe

    check_settings(settings, recipe)
    phases = [p.name for p in recipe.phases if _chosen(settings, p.name)]
    return [f"compile: each decoder layer, {describe(settings)}, in phases {', '.join(phases)}"]


@hookimpl
def srde_before_phase(phase, run):
    settings = _settings(run.recipe)
    if settings.enabled:
        from srde_plugins.compile.regional import compiler_of, decoder_layers

        compiler_of(run).before_phase(decoder_layers(run), phase.name, _chosen(settings, phase.name))


@hookimpl
def srde_configure_model(model, run):
    if _settings(run.recipe).enabled:
        from srde_plugins.compile.regional import compiler_of, decoder_layers

        banks = [bank for per_projection in run.experts.banks().values() for bank in per_projection.values()]
        compiler_of(run).experts_attached(decoder_layers(run), banks)
