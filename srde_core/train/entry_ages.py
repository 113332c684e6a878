"""Adam's bias correction per entry, for parameters whose entries move (a bank's ``set_positions``).

AdamW keeps one step count per parameter, and a remap zeroes the moments of the entries that are
new. With the shared count ``t`` the bias correction of a fresh entry is wrong: its first update
would be ``lr * (1 - b1) / (1 - b1^t) / sqrt((1 - b2) / (1 - b2^t))`` times the sign of its gradient,
about 1.6x the nominal Adam step after 300 steps and 3.2x in the limit. As in SpIEL's reference
optimiser (Ansell et al. 2024, ``SftAdamW``: an ``age`` per entry), each entry here has its own
step count ``s = t - born``: the optimiser state of a parameter with fresh entries holds
``entry_born`` (``[E, P]``, the shared step count when each entry was born, 0 for the original
ones; moved with the entries, saved with the optimiser), and after every optimiser step the update
of those entries is replaced by Adam's with ``s`` in the bias correction:

    p += lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) - m / (1 - b1^s) / (sqrt(v / (1 - b2^s)) + eps))

(decoupled weight decay does not depend on the count). A fresh entry's first update is then the
nominal ``lr * g / (|g| + eps)``, and it goes on exactly as if it had its own Adam from its birth.
"""

from __future__ import annotations

import torch

#: the optimiser-state key of each entry's birth step
BORN = "entry_born"


def mark_born(state: dict, index: torch.Tensor) -> None:
    """In ``state`` (a parameter's optimiser state, already moved to ``index``): entries at -1 in
    ``index`` are born at the current step count."""
    step = state.get("step")
    fresh = index < 0
    if step is None or not bool(fresh.any()):
        return
    born = state.get(BORN)
    if born is None:
        born = torch.zeros(index.shape, dtype=torch.float32, device=index.device)
    state[BORN] = torch.where(fresh, torch.as_tensor(float(step), dtype=born.dtype, device=born.device), born)


@torch.no_grad()
def correct_young_entries(optimizer: torch.optim.Optimizer, args=None, kwargs=None) -> None:
    """An optimiser step post-hook (``register_step_post_hook``): the update of every entry born
    after the start of the phase, with its own step count in Adam's bias correction."""
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), group["eps"]
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or BORN not in state or param.grad is None:
                continue
            t = float(state["step"])
            born = state[BORN]
            age = (t - born.double()).clamp_min(1.0).view(*born.shape, *([1] * (param.dim() - born.dim())))
            m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
            shared = m / (1 - beta1**t) / (v.sqrt() / (1 - beta2**t) ** 0.5 + eps)
            own = m / (1 - beta1**age) / (v.sqrt() / (1 - beta2**age).sqrt() + eps)
            param.add_((lr * (shared - own)).to(param.dtype))
