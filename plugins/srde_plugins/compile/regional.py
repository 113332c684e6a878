"""Regional compilation: ``torch.compile`` of the forward of each decoder layer of the run's model.

Compiling layer by layer (not the whole model) leaves the embedding, the LM head and the losses
eager, confines a graph break to its layer, and lets identical layers share their code: every layer
of a stack traces to the same graph, which inductor generates once (its FX graph cache). Dynamo keeps
the compiled entries of one code object together, and an SRDE layer is guarded on its layer index
(it records its routing by layer), so each decoder layer adds an entry there: the recompile limits
are raised to torch's per-function default (8) per layer, so no layer silently falls back to eager."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srde_core.errors import RecipeError, available, did_you_mean
from srde_core.model.architectures import find_decoder_stack
from srde_plugins.compile import NAME, CompileParams

#: Compiled variants allowed per decoder layer (torch's default for a single function).
RECOMPILES_PER_LAYER = 8


def backend_problem(settings: CompileParams, device_type: str) -> tuple[str, str] | None:
    """``(key, reason)`` when ``settings`` cannot compile on a ``device_type`` machine, else None."""
    backends = torch._dynamo.list_backends(exclude_tags=())
    if settings.backend not in backends:
        return "backend", (f"unknown torch.compile backend '{settings.backend}'"
                           f"{did_you_mean(settings.backend, backends)}; {available(backends)}")
    if settings.mode != "default" and settings.backend != "inductor":
        return "mode", f"mode '{settings.mode}' needs backend 'inductor' (backend is '{settings.backend}')"
    if settings.backend != "inductor":
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else ("backend", "backend 'inductor' on CUDA needs Triton (pip install triton)")
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # inductor's own search failed (InvalidCxxCompiler, or a broken toolchain)
        return "backend", ("backend 'inductor' on CPU needs a C++ compiler (none found: install g++ or set CXX), "
                           "or use backend 'aot_eager'")
    return None


def check_settings(settings: CompileParams, recipe) -> None:
    """One line naming the key when the phases or the backend cannot be used (before any work)."""
    names = [phase.name for phase in recipe.phases]
    for name in settings.phases:
        if name not in names:
            raise RecipeError(f"no phase named '{name}'{did_you_mean(name, names)} (phases: {', '.join(names)})",
                              source=str(recipe.path), key=f"plugins.{NAME}.phases")
    cuda = recipe.device != "cpu" and torch.cuda.is_available()
    problem = backend_problem(settings, "cuda" if cuda else "cpu")
    if problem is not None:
        key, reason = problem
        raise RecipeError(reason, source=str(recipe.path), key=f"plugins.{NAME}.{key}")


def describe(settings: CompileParams) -> str:
    dynamic = "auto" if settings.dynamic is None else str(settings.dynamic).lower()
    return (f"torch.compile(backend={settings.backend}, mode={settings.mode}, dynamic={dynamic}, "
            f"fullgraph={str(settings.fullgraph).lower()})")


def compile_options(settings: CompileParams) -> dict[str, Any]:
    """The keyword arguments of ``torch.compile`` for these settings."""
    return {
        "backend": settings.backend,
        "mode": None if settings.mode == "default" else settings.mode,
        "dynamic": settings.dynamic,
        "fullgraph": settings.fullgraph,
    }


def allow_recompiles(layers: int) -> None:
    """Raise dynamo's recompile limits to :data:`RECOMPILES_PER_LAYER` per decoder layer (never lower them)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILES_PER_LAYER * layers)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILES_PER_LAYER * layers)


@dataclass
class RegionalCompiler:
    """Compiles the decoder layers of a model and restores them (per phase, see the package docs)."""

    settings: CompileParams
    log: Any = print
    chosen: bool = False
    _wrapped: list[tuple[nn.Module, Any]] = field(default_factory=list)

    def compile(self, layers: Sequence[nn.Module]) -> int:
        """Compile the forward of every layer of ``layers`` (again: the previous wrappers are
        dropped first); return the number of layers."""
        self.restore()
        allow_recompiles(len(layers))
        options = compile_options(self.settings)
        for layer in layers:
            wrapper = torch.compile(layer.forward, **options)
            layer.forward = wrapper
            self._wrapped.append((layer, wrapper))
        return len(layers)

    def restore(self) -> None:
        """Every layer this compiler compiled runs its own forward again."""
        for layer, wrapper in self._wrapped:
            if layer.__dict__.get("forward") is wrapper:
                del layer.forward
        self._wrapped.clear()

    def before_phase(self, layers: Sequence[nn.Module], phase_name: str, chosen: bool) -> None:
        self.chosen = chosen
        if chosen:
            count = self.compile(layers)
            self.log(f"compile: phase '{phase_name}': {count} decoder layers compiled")
        elif self._wrapped:
            self.restore()
            self.log(f"compile: phase '{phase_name}' runs eagerly (not in plugins.{NAME}.phases)")

    def experts_attached(self, layers: Sequence[nn.Module], banks: Sequence[nn.Module]) -> None:
        if not self.chosen:
            return
        eager = sorted({type(bank).__name__ for bank in banks if not getattr(bank, "compile_traceable", False)})
        if eager and self.settings.fullgraph:
            raise RecipeError(f"{', '.join(eager)} do not trace (they run eagerly inside the layer: a graph break "
                              "per projection); use fullgraph = false", key=f"plugins.{NAME}.fullgraph")
        count = self.compile(layers)
        note = f"; {', '.join(eager)} run eagerly inside them (a graph break per projection)" if eager else ""
        self.log(f"compile: {count} decoder layers compiled again with the experts attached{note}")


def decoder_layers(run) -> nn.ModuleList:
    """The decoder layers of the run's language model (with experts attached, the stack they were attached to)."""
    return run.experts.stack.layers if run.experts is not None else find_decoder_stack(run.model).layers


def compiler_of(run) -> RegionalCompiler:
    return run.plugin_state(NAME, lambda: RegionalCompiler(run.settings(NAME), log=run.log))


def graph_breaks(module: nn.Module, *args, **kwargs) -> tuple[int, list[str]]:
    """``(count, reasons)`` of the graph breaks dynamo meets in one call of ``module`` (``torch._dynamo.explain``);
    each reason names the line of the code where the graph broke."""
    explained = torch._dynamo.explain(module)(*args, **kwargs)
    reasons = []
    for graph_break in explained.break_reasons:
        where = graph_break.user_stack[-1] if graph_break.user_stack else None
        at = f" ({Path(where.filename).name}:{where.lineno})" if where is not None else ""
        reasons.append(str(graph_break.reason).splitlines()[0] + at)
    return explained.graph_break_count, reasons
