"""The ``adaptive`` scalar schedule (registered by :mod:`srde_plugins.schedules`)."""

from __future__ import annotations

from typing import Any

from srde_core.train.schedules import Schedule


class AdaptiveRamp(Schedule):
    """From ``start`` to ``end`` over a warm-up whose length follows the loss trend.

    The ramp advances by ``rate / steps`` per optimiser step. Every ``patience`` steps the loss's
    moving average (``ema``) is compared with its value at the last check: a relative improvement
    above ``threshold`` multiplies the rate by ``speedup`` (the warm-up shortens); no improvement
    (or a rise) divides it (the warm-up lengthens); in between it stays. The warm-up length stays
    within ``[min_steps, max_steps]``. All of this state is checkpointed.
    """

    def __init__(self, params):
        self.params = params
        self.progress = 0.0
        self.rate = 1.0
        self.ema: float | None = None
        self.reference: float | None = None
        self.since = 0

    def value(self, step: int, total_steps: int) -> float:
        p = self.params
        return p.start + (p.end - p.start) * self.progress

    def observe(self, step: int, metrics: dict[str, Any]) -> None:
        p = self.params
        loss = metrics.get(p.metric)
        if loss is None:
            return
        self.ema = loss if self.ema is None else p.ema * self.ema + (1.0 - p.ema) * loss
        self.progress = min(1.0, self.progress + self.rate / p.steps)
        self.since += 1
        if self.reference is None:
            self.reference = self.ema
        if self.since < p.patience:
            return
        improvement = (self.reference - self.ema) / max(abs(self.reference), 1e-12)
        if improvement > p.threshold:
            self.rate *= p.speedup
        elif improvement <= 0.0:
            self.rate /= p.speedup
        self.rate = min(max(self.rate, p.steps / p.longest), p.steps / p.shortest)
        self.reference, self.since = self.ema, 0

    def done(self, step: int, total_steps: int) -> bool:
        return self.progress >= 1.0

    def warmup_steps(self) -> float:
        """The warm-up length the current rate implies."""
        return self.params.steps / self.rate

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress, "rate": self.rate, "ema": self.ema, "reference": self.reference, "since": self.since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress, self.rate = state["progress"], state["rate"]
        self.ema, self.reference, self.since = state["ema"], state["reference"], state["since"]


#: What the step of every trainer logs, and the router statistics of phases that route.
COMMON_METRICS = ("loss", "grad_norm", "lr", "tokens_per_s")
ROUTER_METRICS = ("router_entropy", "router_max_load")


def phase_metrics(phase) -> set[str]:
    """The step metrics a phase logs: every trainer's, one per loss, the router's, and those its
    trainer declares (a ``step_metrics`` attribute of the trainer's factory)."""
    from srde_core.registry import resolve_object

    declared: tuple[str, ...] = ()
    component = phase.trainer.component
    if component is not None:
        try:
            declared = tuple(getattr(resolve_object(component.factory), "step_metrics", ()))
        except (ImportError, AttributeError):  # an unimportable trainer is named by the component check
            pass
    return {*COMMON_METRICS, *ROUTER_METRICS, *(loss.name for loss in phase.losses), *declared}


def _adaptive(choice) -> list:
    return [c for c in choice.nested() if c.kind == "schedule" and c.name == "adaptive"] if choice is not None else []


def check_metrics(recipe) -> None:
    """An ``adaptive`` schedule follows one step metric: one that no step of its phases logs would
    leave it at ``start`` for the whole run, so the recipe is refused naming the key and the metrics
    that exist. Loss weights are checked against their phase; plugin settings against every phase
    (or the phases the settings name)."""
    from srde_core.errors import RecipeError

    def refuse(key: str, metric: str, where: str, known: set[str]) -> None:
        raise RecipeError(f"adaptive schedule follows metric '{metric}', which {where}; the steps log: "
                          f"{', '.join(sorted(known))}", source=str(recipe.path), key=key)

    for index, phase in enumerate(recipe.phases):
        for position, loss in enumerate(phase.losses):
            weight = loss.weight if hasattr(loss.weight, "nested") else None
            for schedule in _adaptive(weight):
                known = phase_metrics(phase)
                if schedule.params.metric not in known:
                    refuse(f"phases[{index}].losses[{position}].weight.metric", schedule.params.metric,
                           f"phase '{phase.name}' does not log", known)
    for name, settings in recipe.plugin_settings.items():
        if getattr(settings, "enabled", True) is False:
            continue
        chosen = getattr(settings, "phases", None) or [p.name for p in recipe.phases]
        phases = [p for p in recipe.phases if p.name in chosen] or list(recipe.phases)
        for field in type(settings).model_fields:
            value = getattr(settings, field)
            for schedule in _adaptive(value if hasattr(value, "nested") else None):
                known = set().union(*(phase_metrics(p) for p in phases))
                if schedule.params.metric not in known:
                    refuse(f"plugins.{name}.{field}.metric", schedule.params.metric,
                           f"no phase of plugins.{name} logs", known)
