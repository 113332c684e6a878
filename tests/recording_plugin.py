"""A test plugin that implements every hook of :mod:`srde_core.hookspecs` and records each call.

Register an instance in process: ``load_plugins(extra=[("recorder", Recorder())])``. ``calls`` is the
list of ``(hook name, summary of the arguments)`` in call order. The plugin also

- declares the ``[plugins.recorder]`` settings table (``tag``, ``header``) and reads it back through
  ``run.settings("recorder")`` before each phase;
- adds a line to the run header and a ``recorder_steps`` entry to every step's metrics;
- keeps state of its own (the steps it has seen) that travels through checkpoints:
  ``srde_checkpoint_saving`` stores it under ``state["plugins"]["recorder"]`` and
  ``srde_checkpoint_loaded`` restores it on resume;
- can interrupt a run like Ctrl-C: ``interrupt_at = ("experts", 3)`` raises ``KeyboardInterrupt``
  from ``srde_after_step`` of that phase and step.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import Params

NAME = "recorder"


class RecorderSettings(Params):
    tag: str = Field("untagged", description="a value the test sets in the recipe and expects back")
    header: bool = Field(True, description="add a line to the run header")


class Recorder:
    """Records every hook call; see the module docstring."""

    def __init__(self):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.steps_seen: list[tuple[str, int]] = []
        self.restored: list[dict[str, Any]] = []
        self.saved: list[dict[str, Any]] = []
        self.interrupt_at: tuple[str, int] | None = None

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def of(self, hook: str) -> list[dict[str, Any]]:
        return [args for name, args in self.calls if name == hook]

    def _record(self, hook: str, **args: Any) -> None:
        self.calls.append((hook, args))

    # -- start-up --------------------------------------------------------------------------------

    @hookimpl
    def srde_add_kinds(self, kinds):
        self._record("srde_add_kinds", provider=kinds.provider)

    @hookimpl
    def srde_register(self, registry):
        registry.settings(NAME, RecorderSettings, "Options of the recording test plugin.")
        self._record("srde_register", provider=registry.provider)

    @hookimpl
    def srde_add_commands(self, subparsers):
        parser = subparsers.add_parser("recorded", help="print the recorder's tag")
        parser.add_argument("--tag", default=None)
        parser.set_defaults(func=lambda args: print(f"recorded {args.tag}") or 0)
        self._record("srde_add_commands")

    # -- run set-up ------------------------------------------------------------------------------

    @hookimpl
    def srde_run_header(self, recipe):
        settings = recipe.settings(NAME)
        self._record("srde_run_header", recipe=recipe.name, tag=settings.tag)
        return [f"recorder: tag {settings.tag}"] if settings.header else None

    @hookimpl
    def srde_model_load_kwargs(self, recipe):
        self._record("srde_model_load_kwargs", recipe=recipe.name)
        return None

    @hookimpl
    def srde_model_init_context(self, run):
        recorder = self

        @contextlib.contextmanager
        def around_construction():
            recorder._record("model_init_context.enter", model_is_none=run.model is None)
            yield
            recorder._record("model_init_context.exit")

        self._record("srde_model_init_context", model_is_none=run.model is None, data_loaded=run.data is not None)
        return around_construction()

    @hookimpl
    def srde_prepare_data(self, data, run):
        self._record("srde_prepare_data", train=len(data.train), eval=len(data.eval), domains=list(data.domains),
                     model_is_none=run.model is None)

    @hookimpl
    def srde_configure_model(self, model, run):
        from srde_core.model.layer import SRDEMLP

        layers = sum(isinstance(m, SRDEMLP) for m in model.modules())
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self._record("srde_configure_model", srde_layers=layers, trainable=len(trainable),
                     only_experts_train=all(".router." in n or ".banks." in n for n in trainable),
                     same_model=model is run.model)

    # -- training --------------------------------------------------------------------------------

    @hookimpl
    def srde_before_phase(self, phase, run):
        self._record("srde_before_phase", phase=phase.name, tag=run.settings(NAME).tag)

    @hookimpl
    def srde_forward_context(self, context, batch, phase, run):
        self._record(
            "srde_forward_context",
            phase=phase.name,
            domain_ids=None if context.domain_ids is None else context.domain_ids.tolist(),
            batch_keys=sorted(batch),
            batch_size=int(batch["input_ids"].shape[0]),
            routings_before_forward=len(context.routings),
        )

    @hookimpl
    def srde_after_step(self, phase, run, step, metrics):
        self.steps_seen.append((phase.name, step))
        metrics["recorder_steps"] = len(self.steps_seen)
        self._record("srde_after_step", phase=phase.name, step=step, keys=sorted(metrics))
        if self.interrupt_at == (phase.name, step):
            raise KeyboardInterrupt

    @hookimpl
    def srde_after_phase(self, phase, run, metrics):
        self._record("srde_after_phase", phase=phase.name, step=metrics.get("step"), metrics_phase=metrics.get("phase"))

    @hookimpl
    def srde_after_run(self, run):
        from srde_core.run import ADAPTER_FILE, BASE_FILE

        self._record("srde_after_run", adapter_written=(run.run_dir / ADAPTER_FILE).is_file(),
                     base_written=(run.run_dir / BASE_FILE).is_file())

    # -- checkpoints -----------------------------------------------------------------------------

    @hookimpl
    def srde_checkpoint_saving(self, state, run):
        mine = {"steps_seen": list(self.steps_seen), "tag": run.settings(NAME).tag}
        state["plugins"][NAME] = mine
        self.saved.append(copy.deepcopy(mine))
        self._record("srde_checkpoint_saving", step=state["metrics"]["step"], phase=state["metrics"]["phase"],
                     keys=sorted(state))

    @hookimpl
    def srde_checkpoint_loaded(self, state, run):
        mine = state["plugins"][NAME]
        self.restored.append(copy.deepcopy(mine))
        self.steps_seen = [tuple(s) for s in mine["steps_seen"]]
        self._record("srde_checkpoint_loaded", step=state["step"], phase=state["phase"])
