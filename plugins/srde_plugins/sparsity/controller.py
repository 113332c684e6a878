"""The adaptive-sparsity controller of one run (see :mod:`srde_plugins.sparsity`)."""

from __future__ import annotations

from typing import Any

import torch

from srde_core.errors import SRDEError


def controller_of(run) -> Controller | None:
    """The run's controller (made on first use); None when the plugin is off for this run."""
    settings = run.recipe.settings("adaptive_sparsity")
    if not settings.enabled:
        return None
    return run.plugin_state("adaptive_sparsity", lambda: Controller(run, settings))


class Controller:
    def __init__(self, run, settings):
        self.run = run
        self.settings = settings
        self.schedule = settings.density.build()
        self.pruned = False
        self.active_phase = False
        # per bank (in the order of ``experts.banks()``): its parameters when its entries were last
        # masked, and the mask; masked entries are put back to them after every optimiser step
        self.held: dict[int, dict[str, torch.Tensor]] = {}

    def before_phase(self, phase) -> None:
        # phases without experts (dense base pre-training) are skipped in after_step
        self.active_phase = not self.settings.phases or phase.name in self.settings.phases

    def after_step(self, phase, step: int, metrics: dict[str, Any]) -> None:
        experts = self.run.experts
        if not self.active_phase or experts is None:
            return
        banks = [bank for per_proj in experts.banks().values() for bank in per_proj.values()]
        built = [bank.density() for bank in banks]
        if any(d is None for d in built):
            raise SRDEError(
                f"adaptive sparsity needs a delta whose banks have a density (DeltaBank.density); "
                f"'{self.run.recipe.srde.delta.name}' has none", key="plugins.adaptive_sparsity",
            )
        self.schedule.observe(step, metrics)
        density = self.schedule.value(step, phase.steps)
        try:
            if not self.pruned:
                for i, (bank, base) in enumerate(zip(banks, built)):
                    self.restore_masked(i, bank)
                    # each bank keeps the share of its entries as built that makes the scheduled density
                    bank.set_active_fraction(min(1.0, max(density / base, 1e-6)))
                    self.hold_masked(i, bank)
            done = self.schedule.done(step, phase.steps)
            if self.settings.prune and done and not self.pruned:
                for bank in banks:
                    bank.prune()
                self.pruned = True
                self.held = {}
        except NotImplementedError as err:
            raise SRDEError(f"adaptive sparsity: {err}", key="plugins.adaptive_sparsity") from None
        metrics["density"] = density
        metrics["density_in_use"] = density_in_use(banks)

    @torch.no_grad()
    def restore_masked(self, i: int, bank) -> None:
        """Put the masked entries of ``bank`` back where they were when they were masked. They get
        no gradient, but AdamW still moves them (momentum, weight decay); a masked entry keeps its
        value for when a larger fraction brings it back, and the ranking sees that value."""
        held = self.held.get(i)
        if held is None:
            return
        active = held["active"]
        for name, param in bank.named_parameters(recurse=False):
            kept = held.get(name)
            if kept is not None and kept.shape == param.shape:
                mask = active.view(*active.shape, *([1] * (param.dim() - active.dim())))
                param.copy_(torch.where(mask, param, kept))

    @torch.no_grad()
    def hold_masked(self, i: int, bank) -> None:
        """Remember ``bank``'s per-entry parameters and mask after a new masking (nothing when every
        entry is in use)."""
        active = bank.active_mask()
        if active is None:
            self.held.pop(i, None)
            return
        held = {"active": active.clone()}
        for name, param in bank.named_parameters(recurse=False):
            if param.shape[: active.dim()] == active.shape:  # one per entry (or block)
                held[name] = param.detach().clone()
        self.held[i] = held

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "pruned": self.pruned, "held": self.held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.pruned = state["pruned"]
        self.held = state.get("held", {})


def density_in_use(banks) -> float:
    """Entries in use over weight entries, over every bank (each bank's experts counted once:
    the mean of its experts' entries in use)."""
    used = sum(b.active_entries() / b.num_experts for b in banks)
    return used / max(1, sum(b.out_features * b.in_features for b in banks))
