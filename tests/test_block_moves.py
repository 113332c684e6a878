"""Blocks that move: ``set_positions``, ``set_active_fraction``/``prune`` and the learned selectors
on a ``sparse`` bank with block positions, checked block by block against what was there before
and against the dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_exactness import assert_matches
from test_exactness_contracts import session_for
from test_learned_selectors import EXPERTS, HIDDEN, INTERMEDIATE, assert_bank_exact, build_layer, make_bank, randomise

from srde_core.dist import SINGLE
from srde_core.model.components import BankCall
from srde_core.model.context import ForwardContext
from srde_core.model.routing import Routing

BLOCK = (2, 2)


def trained_layer(selector, steps: int = 2, total: int = 8):
    """A layer of block banks and its optimiser session after ``steps`` steps (selectors told)."""
    mlp = build_layer(selector, block=BLOCK)
    session = session_for(mlp)
    for bank in mlp.banks.values():
        bank.add_remap_listener(session.remap)
    generator = torch.Generator().manual_seed(3)
    for step in range(1, steps + 1):
        x, target = torch.randn(20, HIDDEN, generator=generator), torch.randn(20, HIDDEN, generator=generator)
        session.backward(F.mse_loss(mlp(x), target))
        session.step()
        for bank in mlp.banks.values():
            if bank.selector is not None:
                bank.selector.after_step(bank, step, total, SINGLE)
    return mlp, session


def test_moved_blocks_keep_their_values_and_optimiser_state_and_new_ones_start_at_zero():
    mlp, session = trained_layer("magnitude")
    bank = mlp.banks["up_proj"]
    old = bank.selection_positions().clone()
    old_values = bank.values.detach().clone()
    old_state = {k: v.clone() for k, v in session.optimizer.state[bank.values].items()}
    grid = bank.grid_shape[0] * bank.grid_shape[1]
    # each expert keeps every other block and takes new ones it did not own
    new = []
    for e in range(EXPERTS):
        kept = old[e][::2]
        free = torch.tensor([b for b in range(grid) if b not in set(old[e].tolist())])[e : e + old.shape[1] - kept.numel()]
        new.append(torch.sort(torch.cat([kept, free])).values)
    new = torch.stack(new)
    remaps = bank.set_positions(new)
    assert torch.equal(bank.selection_positions(), new) and {tuple(r.new.shape) for r in remaps} == {tuple(old_values.shape)}
    state = session.optimizer.state[bank.values]
    for e in range(EXPERTS):
        slot = {int(b): j for j, b in enumerate(old[e])}
        for j, b in enumerate(new[e].tolist()):
            if b in slot:
                assert torch.equal(bank.values[e, j], old_values[e, slot[b]])
                assert torch.equal(state["exp_avg"][e, j], old_state["exp_avg"][e, slot[b]])
            else:
                assert bool((bank.values[e, j] == 0).all()) and bool((state["exp_avg"][e, j] == 0).all())
    randomise(bank, 5)
    assert_matches(mlp, torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(4)), rtol=1e-5, atol=1e-5)
    assert_bank_exact(bank)


def test_adaptive_sparsity_masks_and_prunes_whole_blocks_of_largest_norm():
    mlp, session = trained_layer("random")
    bank = mlp.banks["down_proj"]
    randomise(bank, 2)
    norm = (torch.sigmoid(bank.importance) * bank.values).flatten(2).norm(dim=2).detach()
    bank.set_active_fraction(0.5)
    keep = round(0.5 * bank.count)
    assert bank.active.sum(1).tolist() == [keep] * EXPERTS
    kept_min = norm.masked_fill(~bank.active, float("inf")).min(1).values
    dropped_max = norm.masked_fill(bank.active, -1.0).max(1).values
    assert bool((kept_min >= dropped_max).all())
    for e in range(EXPERTS):  # a masked block adds nothing: its entries are zero in the dense delta
        dense = bank.delta_weight(e).detach()
        blocks = bank.entry_positions()[e].view(bank.count, -1)
        assert bool((dense.view(-1)[blocks[~bank.active[e]]] == 0).all())
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(1))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    before = mlp(x).detach()
    kept_blocks = bank.selection_positions()[bank.active].view(EXPERTS, keep)
    bank.prune()
    assert bank.count == keep and torch.equal(bank.selection_positions(), kept_blocks)
    assert session.optimizer.state[bank.values]["exp_avg"].shape == bank.values.shape
    torch.testing.assert_close(mlp(x).detach(), before, rtol=0, atol=1e-6)
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_gumbel_topk_on_blocks_hardens_to_whole_chosen_blocks():
    mlp, session = trained_layer({"name": "gumbel_topk", "candidates": 3, "harden_at": 0.5}, steps=3)
    bank = mlp.banks["gate_proj"]
    count = bank.selector.count
    assert bank.count == 3 * count and bank.selector.logits.shape == (EXPERTS, 3 * count)
    assert session.optimizer.state[bank.selector.logits]["exp_avg"].abs().sum() > 0  # the mask trains
    candidates = bank.selection_positions().clone()
    chosen = torch.sort(torch.topk(bank.selector.logits.detach(), count, dim=1).indices, dim=1).values
    old_state = {k: v.clone() for k, v in session.optimizer.state[bank.values].items()}
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(2))
    mlp.eval()
    before = mlp(x).detach()
    bank.selector.after_step(bank, 4, 8, SINGLE)
    assert bank.count == count and bank.selector.entry_scale(bank) is None
    assert torch.equal(bank.selection_positions(), torch.gather(candidates, 1, chosen))
    for key in ("exp_avg", "exp_avg_sq"):  # whole blocks of optimiser state follow
        want = torch.stack([old_state[key][e, chosen[e]] for e in range(EXPERTS)])
        assert torch.equal(session.optimizer.state[bank.values][key], want)
    torch.testing.assert_close(mlp(x).detach(), before, rtol=1e-6, atol=1e-7)  # eval used the same blocks
    mlp.train()
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_spiel_on_blocks_grows_the_block_of_largest_gradient_norm_and_drops_the_smallest():
    out, inp = 8, 8  # a 4 x 4 grid of 2x2 blocks; 4 blocks per expert, one moves per update
    bank = make_bank({"name": "spiel", "every": 1, "fraction": 0.25, "grow": "dense"}, out, inp, density=0.25, block=BLOCK)
    start = bank.selection_positions().clone()
    assert start.shape == (EXPERTS, 4)
    free = sorted(set(range(16)) - set(start[0].tolist()))
    targets = [free[0], free[5], free[11]]  # one block per expert where its gradient is made large
    stale = [1, 3, 0]  # the slot whose block is smallest (|phi|, the block's norm: SpIEL's drop rule)
    with torch.no_grad():
        bank.values.copy_(1.0 + torch.rand(bank.values.shape, generator=torch.Generator().manual_seed(1)))
        for e, slot in enumerate(stale):
            bank.values[e, slot] = 1e-3
    generator = torch.Generator().manual_seed(2)
    xs, gs, experts = [], [], []
    for e, block in enumerate(targets):
        r, c = divmod(block, 4)
        xs.append(F.one_hot(torch.tensor(2 * c + 1), inp).float())  # one entry inside the target block
        gs.append(10.0 * F.one_hot(torch.tensor(2 * r), out).float())
        experts.append(e)
        for _ in range(4):
            xs.append(0.1 * torch.randn(inp, generator=generator))
            gs.append(0.1 * torch.randn(out, generator=generator))
            experts.append(e)
    experts_t = torch.tensor(experts)[:, None]
    n = len(xs)
    routing = Routing(experts_t, torch.ones(n, 1), torch.ones(n, EXPERTS) / EXPERTS, torch.zeros(n, EXPERTS), EXPERTS)
    bank(torch.stack(xs), BankCall(routing, ForwardContext())).backward(torch.stack(gs))
    bank.selector.after_step(bank, 1, 10, SINGLE)
    moved = bank.selection_positions()
    for e in range(EXPERTS):
        kept = [b for slot, b in enumerate(start[e].tolist()) if slot != stale[e]]
        assert moved[e].tolist() == sorted(kept + [targets[e]])
        grown = moved[e] == targets[e]
        assert bool((bank.values[e, grown] == 0).all()) and bool((bank.values[e, ~grown].abs() >= 1).all())
    randomise(bank, 3)
    assert_bank_exact(bank)


def test_an_adapter_saved_before_blocks_could_move_loads():
    bank = make_bank("magnitude", block=BLOCK)
    randomise(bank, 1)
    state = {k: v.detach().clone() for k, v in bank.state_dict().items() if k != "active"}
    fresh = make_bank("random", block=BLOCK, seed=4)
    fresh.load_state_dict(state)
    assert bool(fresh.active.all()) and fresh.active_fraction == 1.0
    x = torch.randn(5, INTERMEDIATE if bank.in_features == INTERMEDIATE else HIDDEN)
    routing = Routing(torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1), torch.ones(5, EXPERTS) / EXPERTS,
                      torch.zeros(5, EXPERTS), EXPERTS)
    call = BankCall(routing, ForwardContext())
    assert torch.equal(fresh(x, call), bank(x, call))


@pytest.mark.parametrize("selector", ["gumbel_topk", "spiel"])
def test_learned_selectors_on_blocks_plan_their_starting_count_on_the_block_grid(selector):
    bank = make_bank({"name": selector}, block=BLOCK, density=0.1)
    grid = (INTERMEDIATE // 2) * (HIDDEN // 2)
    count = round(0.1 * grid)
    assert bank.count == (min(grid, 4 * count) if selector == "gumbel_topk" else count)
