"""Progress display for a phase: a rich bar on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _summary(metrics: dict[str, Any]) -> str:
    parts = [f"loss {metrics['loss']:.4f}"]
    for key in ("lm", "load_balance"):
        if key in metrics and key != "loss":
            parts.append(f"{key} {metrics[key]:.4f}")
    parts.append(f"lr {metrics['lr']:.2e}")
    parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)


class PhaseProgress:
    def __init__(self, console, phase_name: str, start: int, total: int, *, enabled: bool = True):
        self.console = console
        self.phase_name = phase_name
        self.total = total
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn(f"[bold]{phase_name}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[summary]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=console,
            )
            self._task = self._progress.add_task(phase_name, total=total, completed=start, summary="")

    def __enter__(self) -> PhaseProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, metrics: dict[str, Any] | None, eta_s: float) -> None:
        if self._progress is not None:
            fields = {"summary": _summary(metrics)} if metrics else {}
            self._progress.update(self._task, completed=step, **fields)
        elif metrics is not None and self.enabled:
            self.console.print(
                f"{self.phase_name} {step}/{self.total}  {_summary(metrics)}  ETA {eta_s:.0f}s", highlight=False
            )
