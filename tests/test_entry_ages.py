"""Adam's bias correction per entry (`srde_core.train.entry_ages`): an entry grown by a remap late
in a phase takes the steps a fresh Adam would, not the oversized ones of the shared step count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from srde_core.model.components import Remap
from srde_core.train.driver import TrainingTarget
from srde_core.train.engine import OptimizerSpec, TorchSession
from srde_core.train.entry_ages import BORN


class Entries(nn.Module):
    def __init__(self):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(1, 3, dtype=torch.float64))


def session_of(module: nn.Module, weight_decay: float = 0.0) -> TorchSession:
    target = TrainingTarget(model=module, parameters=list(module.parameters()), get_state=module.state_dict,
                            set_state=module.load_state_dict)
    spec = OptimizerSpec(lr=1e-2, weight_decay=weight_decay, betas=(0.9, 0.999), max_grad_norm=None,
                         schedule=lambda step: 1.0, precision="fp32")
    return TorchSession(target, spec, torch.device("cpu"))


def gradient(step: int) -> torch.Tensor:
    return torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64) * (1.0 + 0.3 * torch.sin(torch.tensor(step * 1.0)))


def test_an_entry_grown_after_300_steps_moves_as_a_fresh_adam_would():
    module = Entries()
    session = session_of(module, weight_decay=0.01)
    for step in range(300):
        module.values.grad = gradient(step)
        session.step()
    # entry 1 moves to a new position: its value and moments start at 0, the others keep theirs
    index = torch.tensor([[0, -1, 2]])
    with torch.no_grad():
        module.values[0, 1] = 0.0
    session.remap([Remap(module.values, module.values, index)])
    fresh = nn.Parameter(torch.zeros(1, dtype=torch.float64))  # the same entry under its own AdamW
    reference = torch.optim.AdamW([fresh], lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999))
    for step in range(300, 320):
        before = module.values.detach().clone()
        module.values.grad = gradient(step)
        fresh.grad = gradient(step)[0, 1:2].clone()
        session.step()
        reference.step()
        torch.testing.assert_close(module.values[0, 1:2].detach(), fresh.detach(), rtol=1e-9, atol=1e-12)
        if step == 300:  # the first update of the fresh entry is the nominal Adam step, lr * sign(g)
            assert abs(float(module.values[0, 1] - before[0, 1])) == pytest.approx(1e-2, rel=1e-6)
    assert session.optimizer.state[module.values][BORN].tolist() == [[0.0, 300.0, 0.0]]
    # the entries that were not moved train on as before (their count is the shared one)
    twin = Entries()
    twin_session = session_of(twin, weight_decay=0.01)
    for step in range(320):
        twin.values.grad = gradient(step)
        twin_session.step()
    torch.testing.assert_close(module.values[0, [0, 2]].detach(), twin.values[0, [0, 2]].detach(), rtol=1e-12, atol=1e-14)


def test_entry_ages_move_with_their_entries_and_survive_save_and_load(tmp_path):
    module = Entries()
    session = session_of(module)
    for step in range(5):
        module.values.grad = gradient(step)
        session.step()
    session.remap([Remap(module.values, module.values, torch.tensor([[0, -1, 2]]))])
    for step in range(5, 7):
        module.values.grad = gradient(step)
        session.step()
    session.remap([Remap(module.values, module.values, torch.tensor([[1, 2, -1]]))])  # entries shift left
    assert session.optimizer.state[module.values][BORN].tolist() == [[5.0, 0.0, 7.0]]
    session.save(tmp_path, is_main=True)
    other = Entries()
    resumed = session_of(other)
    resumed.load(tmp_path)
    for s in (session, resumed):
        s.target.model.values.grad = gradient(7)
        s.step()
    assert torch.equal(module.values, other.values)

