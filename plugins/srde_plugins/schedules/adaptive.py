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
