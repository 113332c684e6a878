"""The core's step driver gives every selector a trained bank keeps its after_step, whatever the
bank's family (no plugin reaches into another's attributes)."""

from __future__ import annotations

import types

import torch

from conftest import run_recipe_in
from srde_core.hookspecs import hookimpl
from srde_core.model.components import BankCall, DeltaBank, DeltaType, Selector
from srde_core.plugins import load_plugins


class Counting(Selector):
    """Remembers every after_step it gets (a buffer, so the bank keeps it as state)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(0))
        self.steps: list[tuple[int, int]] = []

    def select(self, weight, num_experts, count, generator):
        return torch.arange(count).repeat(num_experts, 1)

    def after_step(self, bank, step, total_steps, dist):
        self.steps.append((step, total_steps))


class ChooserBank(DeltaBank):
    """A dense bank of another family, keeping its selector as ``chooser``."""

    trainable_names = ("deltas",)

    def __init__(self, out_features, in_features, num_experts):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.deltas = torch.nn.Parameter(torch.zeros(num_experts, out_features, in_features))
        self.chooser = Counting()

    def forward(self, x, call: BankCall):
        terms = torch.einsum("tkoi,ti->tko", self.deltas.to(x.dtype)[call.routing.experts], x)
        return (call.routing.weights.to(x.dtype).unsqueeze(-1) * terms).sum(1)

    def delta_weight(self, expert):
        return self.deltas[expert]


class Chooser(DeltaType):
    def __init__(self, params):
        pass

    def make_bank(self, weight, num_experts, generator):
        return ChooserBank(*weight.shape, num_experts)


plugin = types.SimpleNamespace(srde_register=hookimpl(lambda registry: registry.add("delta", "chooser", Chooser)))


def test_the_driver_steps_the_selectors_of_every_trained_bank(tmp_path, micro_recipe):
    plugins = load_plugins(extra=[("chooser-delta", plugin)])
    recipe = tmp_path / "chooser.toml"
    recipe.write_text(f'extends = "{micro_recipe.as_posix()}"\nname = "chooser"\n[srde]\ndelta = "chooser"\n'
                      '[[phases]]\nname = "experts"\ntrainer = "joint"\nsteps = 3\nbatch_size = 4\nlosses = ["lm"]\n')
    run = run_recipe_in(tmp_path, recipe, plugins)
    banks = [bank for per_proj in run.experts.banks().values() for bank in per_proj.values()]
    assert banks and all(bank.selectors() == [bank.chooser] for bank in banks)
    assert all(bank.chooser.steps == [(1, 3), (2, 3), (3, 3)] for bank in banks)
