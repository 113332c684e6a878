"""How a sparse bank stores and moves its entries: rows shared by every expert stored once, and what
both the entry bank and the block bank do in ``set_positions``, ``prune`` and a resize on load.

Positions are sorted per expert, so where each new position sat among the old ones is one
``searchsorted``; every per-position tensor (``[E, P]`` for entries, ``[E, nb, bh, bw]`` for blocks)
then follows the same index, and so does the optimiser state (:class:`Remap`).
"""

from __future__ import annotations

import torch
from torch import nn

from srde_core.model.components import Remap
from srde_core.train.engine import follow_remap


def move_index(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``[E, P']``: for each new position the slot it held among the ``old`` ones (both ``[E, *]``,
    sorted per row), -1 for a position the expert did not own."""
    old = old.contiguous()
    slot = torch.searchsorted(old, new).clamp_(max=old.shape[1] - 1)
    return torch.where(torch.gather(old, 1, slot) == new, slot, torch.full_like(slot, -1))


def moved(tensor: torch.Tensor, index: torch.Tensor, fresh: float | bool) -> torch.Tensor:
    """``tensor`` ``[E, P, ...]`` moved to ``index`` (see :func:`move_index`), ``fresh`` at new positions."""
    shaped = index.view(*index.shape, *([1] * (tensor.dim() - index.dim())))
    filler = torch.full((), fresh, dtype=tensor.dtype, device=tensor.device)
    return torch.where(shaped >= 0, follow_remap(tensor, index), filler)


def move_parameters(bank: nn.Module, index: torch.Tensor, fresh: dict[str, float]) -> list[Remap]:
    """Move the bank's parameters named in ``fresh`` (name -> the value of a new entry) to ``index``:
    in place when the count stays, else replaced by new parameters. Returns their remaps."""
    remaps = []
    for name, value in fresh.items():
        param = getattr(bank, name)
        data = moved(param.detach(), index, value)
        if data.shape == param.shape:
            param.data.copy_(data)
            remaps.append(Remap(param, param, index))
        else:
            new = nn.Parameter(data, requires_grad=param.requires_grad)
            setattr(bank, name, new)
            remaps.append(Remap(param, new, index))
    return remaps


def resize_parameters(bank: nn.Module, count: int, names: tuple[str, ...]) -> list[Remap]:
    """Replace the named ``[E, P, ...]`` parameters by zeros of ``P = count`` (a state of another
    size is about to be loaded into them); every entry is fresh."""
    remaps = []
    for name in names:
        old = getattr(bank, name)
        shape = (old.shape[0], count, *old.shape[2:])
        new = nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)
        setattr(bank, name, new)
        remaps.append(Remap(old, new, torch.full((old.shape[0], count), -1, dtype=torch.long, device=old.device)))
    return remaps


def keep_active(active: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The ``[E, n]`` positions whose ``active`` flag is set (every expert keeps as many)."""
    counts = active.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("experts have different numbers of active entries; cannot prune to one size")
    return positions[active].view(active.shape[0], int(counts[0]))


def stored_rows(index: torch.Tensor) -> torch.Tensor:
    """``index`` ``[E, ...]`` as it is stored: its first row ``[1, ...]`` when every row is the
    same (experts that share positions), else itself."""
    if index.shape[0] > 1 and (index.stride(0) == 0 or (not index.is_meta and bool((index == index[:1]).all()))):
        return index[:1].clone()
    return index


def keep_selector(bank: nn.Module, selector) -> None:
    """Keep ``selector`` as the bank's submodule ``selector`` when it owns state (a learned one: it
    trains and saves with the bank), and list the bank's trainable names with the selector's."""
    owns_state = selector is not None and any(True for _ in selector.state_dict())
    bank.selector = selector if owns_state else None
    bank.trainable_names = ("values", "importance") + (
        tuple(f"selector.{name}" for name in selector.trainable_names) if owns_state else ()
    )


def scaled_entries(values: torch.Tensor, scale: torch.Tensor, selector) -> torch.Tensor:
    """``values`` (``[E, n]``, or ``[E, n, bh, bw]`` for blocks) times a selector's ``entry_scale``
    (``[E, n]``). The forward is the product either way. A selector with
    ``values_through_scale = True`` passes the values' gradient straight through the scale (the
    entries' gradient, as if the scale were 1: every entry it scales learns, chosen or not), while
    the scale gets ``values`` times the entries' gradient as in the product."""
    scale = scale.view(*scale.shape, *([1] * (values.dim() - scale.dim())))
    if not getattr(selector, "values_through_scale", False):
        return values * scale
    fixed = scale.detach()
    return values * fixed + (values - values.detach()) * (1 - fixed) + values.detach() * (scale - fixed)
