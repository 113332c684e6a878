"""Learned selectors of the ``sparse`` delta (`srde_plugins.deltas.sparse.learned`): ``gumbel_topk``
(straight-through Gumbel top-k over candidates, then hardened) and ``spiel`` (drop-and-grow).

Exact against the dense reference with the entry scale included, in every state (training mask,
eval mask, hardened, after a move); moves keep positions sorted and unique and move optimiser
state with the entries; adapters carry the learned positions and selector state; drop-and-grow
moves toward the large gradients of a constructed case; a resumed run ends bit-identical.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from srde_testkit import make_router
from test_exactness import GatedMLP, assert_matches
from test_exactness_contracts import session_for

from srde_core.dist import SINGLE
from srde_core.errors import SRDEError
from srde_core.model.components import BankCall
from srde_core.model.context import ForwardContext
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.model.routing import Routing
from srde_core.plugins import load_plugins
from srde_core.recipe import load_recipe, resolve_component
from srde_core.run import open_finished_run
from srde_plugins.deltas.sparse.bank import position_count
from srde_plugins.deltas.sparse.learned import GumbelTopK, SpIEL

PLUGINS = load_plugins()
HIDDEN, INTERMEDIATE, EXPERTS = 12, 20, 3
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


#: entries, and blocks of 2x2 entries (learned selectors then move whole blocks)
BLOCKS = [(1, 1), (2, 2)]
BLOCK_IDS = ["entries", "blocks"]


def sparse_delta(selector: dict, density: float = 0.1, block: tuple[int, int] = (1, 1)):
    spec = {"name": "sparse", "density": density, "selector": selector, "block": list(block)}
    return resolve_component(PLUGINS, "delta", spec).build()


def make_bank(selector: dict, out: int = INTERMEDIATE, inp: int = HIDDEN, *, density: float = 0.1, seed: int = 0,
              block: tuple[int, int] = (1, 1)):
    weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    bank = sparse_delta(selector, density, block).make_bank(weight, EXPERTS, torch.Generator().manual_seed(seed))
    bank.values.requires_grad_(True)
    return bank


def build_layer(selector: dict, *, seed: int = 0, top_k: int = 2, block: tuple[int, int] = (1, 1)) -> SRDEMLP:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = GatedMLP(HIDDEN, INTERMEDIATE).requires_grad_(False)
    delta = sparse_delta(selector, block=block)
    banks = {name: delta.make_bank(getattr(base, name).weight.detach(), EXPERTS, generator) for name in PROJECTIONS}
    for bank in banks.values():
        for name, p in bank.named_parameters():
            p.requires_grad_(name in bank.trainable_names)
    return SRDEMLP(base, make_router(HIDDEN, EXPERTS, top_k, seed), banks)


def randomise(bank, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in bank.trainable_names:
            bank.get_parameter(name).normal_(0.0, 0.5, generator=generator)


def routing_of(tokens: int, top_k: int, seed: int, dtype=torch.float64) -> Routing:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, generator=generator, dtype=dtype)
    experts = torch.topk(logits, top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, generator=generator, dtype=dtype).requires_grad_(True)
    return Routing(experts, weights, logits.softmax(-1), logits, EXPERTS)


def reference(bank, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``y_t = sum_k w_tk dW_{e_tk} x_t`` with every expert's dense ``dW`` from ``delta_weight``."""
    deltas = torch.stack([bank.delta_weight(e) for e in range(bank.num_experts)])  # [E, out, in]
    per_slot = torch.einsum("tkoi,ti->tko", deltas[routing.experts], x)
    return (routing.weights[..., None] * per_slot).sum(1)


def assert_bank_exact(bank, *, tol: float = 1e-9, seed: int = 3) -> None:
    """Bank forward/backward == the dense reference in float64: output, input, gate weights and
    every trainable tensor (selector logits included)."""
    bank = bank.double()
    routing = routing_of(17, 2, seed)
    x = torch.randn(17, bank.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    grad = torch.randn(17, bank.out_features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    tensors = [x, routing.weights] + [bank.get_parameter(n) for n in bank.trainable_names]
    results = []
    for forward in (lambda: bank(x, BankCall(routing, ForwardContext())), lambda: reference(bank, x, routing)):
        y = forward()
        grads = torch.autograd.grad((y * grad).sum(), tensors, allow_unused=True)
        results.append((y.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]))
    (y_fast, g_fast), (y_ref, g_ref) = results
    torch.testing.assert_close(y_fast, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    names = ["x", "weights", *bank.trainable_names]
    for name, a, b in zip(names, g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-30), msg=lambda m, n=name: f"{n}: {m}")


def assert_sorted_unique(positions: torch.Tensor, numel: int) -> None:
    assert positions.dtype == torch.long and positions.min() >= 0 and positions.max() < numel
    assert bool((positions[:, 1:] > positions[:, :-1]).all())


GUMBEL = {"name": "gumbel_topk", "candidates": 3, "harden_at": 4}
SPIEL = {"name": "spiel", "every": 1, "fraction": 0.25}


def spiel_move(bank) -> None:
    """One drop-and-grow update of a spiel bank driven by a random batch."""
    routing = routing_of(11, 2, 5, dtype=bank.values.dtype)
    x = torch.randn(11, bank.in_features, generator=torch.Generator().manual_seed(6), dtype=bank.values.dtype)
    bank(x, BankCall(routing, ForwardContext())).sum().backward()
    before = bank.entry_positions().clone()
    bank.selector.after_step(bank, 1, 10, SINGLE)
    assert not torch.equal(bank.entry_positions(), before)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("state", ["gumbel-train", "gumbel-eval", "gumbel-hardened", "spiel-moved"])
def test_banks_with_learned_selectors_match_the_dense_reference(state, block):
    bank = make_bank(SPIEL if state.startswith("spiel") else GUMBEL, block=block)
    randomise(bank, 1)
    if state == "gumbel-eval":
        bank.eval()
    if state == "gumbel-hardened":
        bank.selector.after_step(bank, 4, 8, SINGLE)
        assert bank.count == bank.selector.count and bank.selector.entry_scale(bank) is None
    if state == "spiel-moved":
        spiel_move(bank)
        randomise(bank, 2)
    assert_bank_exact(bank)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("selector", [GUMBEL, SPIEL], ids=["gumbel_topk", "spiel"])
def test_layers_with_learned_selectors_match_the_dense_reference_float32(selector, block):
    mlp = build_layer(selector, block=block)
    for bank in mlp.banks.values():
        randomise(bank, 4)
    x = torch.randn(3, 7, HIDDEN, generator=torch.Generator().manual_seed(2))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)
    mlp.eval()
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_gumbel_mask_is_hard_top_k_forward_and_a_sigmoid_relaxation_backward():
    bank = make_bank({"name": "gumbel_topk", "candidates": 4, "temperature": {"name": "linear", "start": 2.0, "end": 0.5}})
    selector: GumbelTopK = bank.selector
    count = position_count(0.1, INTERMEDIATE, HIDDEN)
    assert selector.count == count and bank.count == 4 * count
    assert bank.entry_positions().unique(dim=0).shape[0] == 1  # candidates: the top |W|, shared
    randomise(bank, 1)
    selector.after_step(bank, 3, 10, SINGLE)  # the next step is step 3 (0-based) of 0..9
    tau = 2.0 - 1.5 * 3 / 4  # the schedule spans steps 0..4, before hardening after step 5 (harden_at 0.5)
    scale = selector.entry_scale(bank)
    perturbed = selector.logits.detach() + selector.gumbel(3)
    top = torch.topk(perturbed, count, dim=1).indices
    assert torch.equal(scale.detach(), torch.zeros_like(scale).scatter_(1, top, 1.0))  # exactly hard
    weights = torch.randn(scale.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((scale * weights).sum(), selector.logits)
    ranked = torch.sort(perturbed, dim=1, descending=True).values
    soft = torch.sigmoid((perturbed - (ranked[:, count - 1 : count] + ranked[:, count : count + 1]) / 2) / tau)
    torch.testing.assert_close(grad, weights * soft * (1 - soft) / tau, rtol=1e-5, atol=1e-7)
    # the noise is a function of the step: the same within a step, new at the next one
    assert torch.equal(selector.entry_scale(bank).detach(), scale.detach())
    selector.after_step(bank, 4, 10, SINGLE)
    assert not torch.equal(selector.entry_scale(bank).detach(), scale.detach())
    bank.eval()  # no noise: the top-count logits
    eval_top = torch.topk(selector.logits.detach(), count, dim=1).indices
    assert torch.equal(selector.entry_scale(bank), torch.zeros_like(scale).scatter_(1, eval_top, 1.0))


def test_gumbel_hardens_to_the_chosen_positions_and_the_optimiser_state_follows():
    mlp = build_layer({"name": "gumbel_topk", "harden_at": 0.5})
    session = session_for(mlp)
    mlp.banks["up_proj"].add_remap_listener(session.remap)
    generator = torch.Generator().manual_seed(3)
    bank = mlp.banks["up_proj"]
    for step in range(1, 4):  # harden_at 0.5 of 8 steps: after step 4
        session.backward(F.mse_loss(mlp(torch.randn(20, HIDDEN, generator=generator)), torch.randn(20, HIDDEN, generator=generator)))
        session.step()
        bank.selector.after_step(bank, step, 8, SINGLE)
    assert bank.count == 4 * bank.selector.count  # not yet: all candidates
    x = torch.randn(9, HIDDEN, generator=generator)
    mlp.eval()
    before_output = mlp(x).detach()
    candidates = bank.entry_positions().clone()
    chosen = torch.topk(bank.selector.logits.detach(), bank.selector.count, dim=1).indices
    old_values = bank.values
    old_state = {k: v.clone() for k, v in session.optimizer.state[old_values].items()}
    bank.selector.after_step(bank, 4, 8, SINGLE)
    positions = bank.entry_positions()
    assert positions.shape == (EXPERTS, bank.selector.count)
    assert_sorted_unique(positions, INTERMEDIATE * HIDDEN)
    assert not torch.equal(positions[0], positions[1])  # each expert its own choice
    slots = torch.sort(chosen, dim=1).values  # candidates are sorted: chosen slots map in order
    assert torch.equal(positions, torch.gather(candidates, 1, slots))
    new_state = session.optimizer.state[bank.values]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new_state[key], torch.gather(old_state[key], 1, slots))
    torch.testing.assert_close(mlp(x).detach(), before_output, rtol=1e-6, atol=1e-7)  # eval: the same entries
    mlp.train()
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_spiel_grows_where_the_gradient_is_large_and_drops_the_smallest_entries():
    out, inp = 6, 8
    bank = make_bank({"name": "spiel", "every": 1, "fraction": 0.25, "grow": "dense"}, out, inp, density=1 / 6)
    positions = bank.entry_positions().clone()  # 8 per expert: the top |W|, shared
    assert positions.shape == (EXPERTS, 8)
    free = sorted(set(range(out * inp)) - set(positions[0].tolist()))
    targets = [free[3:5], free[10:12], free[20:22]]  # where each expert's gradient is made large
    stale = [[0, 5], [2, 7], [1, 3]]  # the slots of smallest |value|
    with torch.no_grad():
        bank.values.copy_(1.0 + torch.rand(bank.values.shape, generator=torch.Generator().manual_seed(1)))
        for e, slots in enumerate(stale):
            bank.values[e, slots] = torch.tensor([1e-3, -2e-3])
    # Expert e sees small random tokens plus, per target (i, j), a token x = e_j with dL/dy = 10 e_i.
    generator = torch.Generator().manual_seed(2)
    xs, gs, experts = [], [], []
    for e, cells in enumerate(targets):
        for p in cells:
            i, j = divmod(p, inp)
            xs.append(F.one_hot(torch.tensor(j), inp).float())
            gs.append(10.0 * F.one_hot(torch.tensor(i), out).float())
            experts.append(e)
        for _ in range(4):
            xs.append(0.1 * torch.randn(inp, generator=generator))
            gs.append(0.1 * torch.randn(out, generator=generator))
            experts.append(e)
    experts = torch.tensor(experts)[:, None]
    routing = Routing(experts, torch.ones(len(xs), 1), torch.ones(len(xs), EXPERTS) / EXPERTS, torch.zeros(len(xs), EXPERTS), EXPERTS)
    bank(torch.stack(xs), BankCall(routing, ForwardContext())).backward(torch.stack(gs))
    bank.selector.after_step(bank, 1, 10, SINGLE)
    moved = bank.entry_positions()
    assert_sorted_unique(moved, out * inp)
    for e in range(EXPERTS):
        kept = [p for slot, p in enumerate(positions[e].tolist()) if slot not in stale[e]]
        assert moved[e].tolist() == sorted(kept + targets[e])
    # kept entries keep their values, grown ones start at 0
    for e in range(EXPERTS):
        grown = torch.isin(moved[e], torch.tensor(targets[e]))
        assert bool((bank.values[e, grown] == 0).all()) and bool((bank.values[e, ~grown].abs() >= 1).all())
    assert bank.selector._gradient is None  # the dense gradient lives for the update step only


def test_spiel_moves_only_on_its_steps_and_keeps_the_optimiser_state_of_kept_entries():
    mlp = build_layer({"name": "spiel", "every": 2, "fraction": 0.2, "until": 4})
    session = session_for(mlp)
    bank = mlp.banks["down_proj"]
    bank.add_remap_listener(session.remap)
    generator = torch.Generator().manual_seed(3)
    history = []
    for step in range(1, 7):
        session.backward(F.mse_loss(mlp(torch.randn(20, HIDDEN, generator=generator)), torch.randn(20, HIDDEN, generator=generator)))
        session.step()
        old_positions, old_state = bank.entry_positions().clone(), {k: v.clone() for k, v in session.optimizer.state[bank.values].items()}
        for per_bank in mlp.banks.values():
            per_bank.selector.after_step(per_bank, step, 6, SINGLE)
        positions = bank.entry_positions()
        history.append(not torch.equal(positions, old_positions))
        assert_sorted_unique(positions, bank.out_features * bank.in_features)
        state = session.optimizer.state[bank.values]
        for e in range(EXPERTS):
            slot = {int(p): j for j, p in enumerate(old_positions[e])}
            for j, p in enumerate(positions[e].tolist()):
                want = old_state["exp_avg"][e, slot[p]] if p in slot else torch.zeros(())
                assert torch.equal(state["exp_avg"][e, j], want)
    assert history == [False, True, False, True, False, False]  # every 2 steps, until step 4
    x = torch.randn(9, HIDDEN, generator=generator)
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("selector", [GUMBEL, SPIEL], ids=["gumbel_topk", "spiel"])
def test_a_bank_state_loads_into_a_fresh_bank_with_the_learned_positions(selector, block):
    bank = make_bank(selector, block=block)
    randomise(bank, 1)
    if selector["name"] == "gumbel_topk":
        bank.selector.after_step(bank, 4, 8, SINGLE)  # hardened: fewer entries than a fresh bank
    else:
        spiel_move(bank)
    state = {k: v.detach().clone() for k, v in bank.state_dict().items()}
    assert any(k.startswith("selector.") for k in state)
    fresh = make_bank(selector, block=block)
    assert fresh.count != bank.count or not torch.equal(fresh.entry_positions(), bank.entry_positions())
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    routing = routing_of(9, 2, 7, dtype=torch.float32)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(8))
    for b in (bank, fresh):
        b.eval()
    assert torch.equal(fresh(x, BankCall(routing, ForwardContext())), bank(x, BankCall(routing, ForwardContext())))


@pytest.mark.parametrize("block", [(1, 1), (4, 4)], ids=BLOCK_IDS)
@pytest.mark.parametrize(
    "selector",
    ['{ name = "gumbel_topk", harden_at = 5 }', '{ name = "spiel", every = 2, fraction = 0.25, until = 1.0 }'],
    ids=["gumbel_topk", "spiel"],
)
def test_a_run_with_a_learned_selector_moves_entries_and_resumes_exactly(tmp_path, plugins, micro_recipe, selector, block):
    from conftest import run_recipe_in

    overrides = [
        f"srde.delta={{ name = \"sparse\", density = 0.05, selector = {selector}, block = {list(block)} }}",
        "phases.experts.steps=8", "phases.experts.checkpoint_every=3", "phases.experts.keep_checkpoints=3",
    ]
    run_recipe_in(tmp_path, micro_recipe, plugins, overrides)
    run_dir = tmp_path / "runs" / "micro"
    full = load_file(run_dir / "adapter.safetensors")
    suffix = ".positions" if block == (1, 1) else ".blocks"
    positions = {k: v for k, v in full.items() if k.endswith(suffix)}
    count = position_count(0.05, 128 // block[0], 64 // block[1])
    assert positions and all(v.shape[-1] == count for v in positions.values())  # the recipe's density at the end
    if "gumbel" in selector:
        assert any(k.endswith("selector.logits") for k in full)
    else:  # entries moved away from the shared top-|W| start
        assert all(v.shape[0] == 4 and not torch.equal(v[0], v[1]) for v in positions.values())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # Kill after the checkpoint at step 3 (before the moves of steps 4-8) and resume.
    for step in (6, 8):
        shutil.rmtree(run_dir / "checkpoints" / f"experts-step{step:07d}")
    (run_dir / "adapter.safetensors").unlink()
    run_recipe_in(tmp_path, micro_recipe, plugins, overrides, resume=True)
    resumed = load_file(run_dir / "adapter.safetensors")
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] == metrics[-1]["loss"] and last["step"] == 8

    # The adapter loads into a freshly built model (a hardened bank shrinks to its saved size).
    reopened = open_finished_run(run_dir, Console(file=io.StringIO()))
    state = reopened.experts.adapter_state()
    assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in full)


@pytest.mark.parametrize("name", ["gumbel_topk", "spiel"])
def test_the_ablation_recipes_change_only_the_selector(plugins, name):
    tiny = load_recipe(RECIPES / "tiny.toml", plugins)
    ablation = load_recipe(RECIPES / "ablations" / f"{name}.toml", plugins)
    assert ablation.name == f"ablation-{name}"
    assert ablation.srde.delta.params.selector.name == name
    assert ablation.srde.delta.params.density == tiny.srde.delta.params.density
    strip = lambda r: {k: v for k, v in r.resolved.items() if k not in ("name", "description", "srde")}  # noqa: E731
    assert strip(ablation) == strip(tiny)
    delta = lambda r: {k: v for k, v in r.resolved["srde"]["delta"].items() if k != "selector"}  # noqa: E731
    assert delta(ablation) == delta(tiny)
    assert {k: v for k, v in ablation.resolved["srde"].items() if k != "delta"} == {
        k: v for k, v in tiny.resolved["srde"].items() if k != "delta"
    }


def test_spiel_and_gumbel_arguments_are_checked(plugins):
    for spec in ({"name": "gumbel_topk", "harden_at": 1.5}, {"name": "gumbel_topk", "harden_at": 0},
                 {"name": "spiel", "until": 0.0}, {"name": "gumbel_topk", "candidates": 0.5}):
        with pytest.raises(SRDEError):
            resolve_component(plugins, "selector", spec)
    assert isinstance(resolve_component(plugins, "selector", {"name": "spiel", "start": "random"}).build(), SpIEL)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("grow", ["dense", "candidates"])
def test_spiel_measures_the_same_gradient_under_activation_checkpointing(reentrant, grow):
    from torch.utils.checkpoint import checkpoint

    measured = []
    for checkpointed in (False, True):
        mlp = build_layer({"name": "spiel", "every": 1, "grow": grow})
        x = torch.randn(15, HIDDEN, generator=torch.Generator().manual_seed(4), requires_grad=True)
        y = checkpoint(mlp, x, use_reentrant=reentrant) if checkpointed else mlp(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        measured.append({name: measured_gradient(bank) for name, bank in mlp.banks.items()})
    for name, gradient in measured[0].items():
        assert gradient is not None and gradient.abs().sum() > 0
        torch.testing.assert_close(measured[1][name], gradient, rtol=1e-6, atol=1e-7)


def measured_gradient(bank) -> torch.Tensor | None:
    """What a spiel selector measured: the dense ``[E, out, in]`` gradient (grow = "dense"), or the
    accumulated gradient at its candidate pool, ``[E, C, k]`` in pool order."""
    selector = bank.selector
    if selector._gradient is not None:  # grow = "dense", or the step that picks a gradient pool
        return selector._gradient
    _, slot = selector._pool_entries(bank)
    total = selector.pool_gradient if selector._local_gradient is None else selector.pool_gradient + selector._local_gradient
    return torch.gather(total, 1, slot).view(*selector.pool.shape, -1)  # this step's sum not yet committed


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("grow", ["dense", "candidates"])
def test_spiel_measures_the_gradient_of_each_experts_dense_delta(grow, block):
    """``G_e = sum_t w_t g_t x_t^T``: the gradient of the loss with respect to a dense ``dW_e`` (at
    every position, or at the entries of the candidate pool)."""
    bank = make_bank({"name": "spiel", "every": 1, "grow": grow, "pool": "uniform"}, block=block).double()
    routing = routing_of(13, 2, 9)
    x = torch.randn(13, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    grad = torch.randn(13, INTERMEDIATE, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    bank(x, BankCall(routing, ForwardContext())).backward(grad)
    dense = torch.zeros(EXPERTS, INTERMEDIATE, HIDDEN, dtype=torch.float64, requires_grad=True)
    y = (routing.weights[..., None].detach() * torch.einsum("tkoi,ti->tko", dense[routing.experts], x)).sum(1)
    (expected,) = torch.autograd.grad((y * grad).sum(), dense)
    if grow == "candidates":
        entries = bank.selection_entries(bank.selector.pool)  # [E, C, k]
        assert entries.shape[1] > 0
        expected = torch.gather(expected.reshape(EXPERTS, -1), 1, entries.flatten(1)).view(entries.shape)
    torch.testing.assert_close(measured_gradient(bank), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_spiel_candidates_grow_the_largest_accumulated_gradient_in_the_pool_and_redraw_it(block):
    """grow = "candidates", pool = "uniform": the pool holds cells no expert owns, the same for the same seed; the
    gradient is summed over the steps of a window; growth takes the pool's largest; then a new
    pool is drawn."""
    selector = {"name": "spiel", "every": 2, "fraction": 0.25, "grow": "candidates", "candidates": 2, "pool": "uniform"}
    bank = make_bank(selector, block=block, density=0.2)
    twin = make_bank(selector, block=block, density=0.2)
    pool = bank.selector.pool.clone()
    assert torch.equal(pool, twin.selector.pool)  # a function of the seed: every process draws the same
    count = bank.count
    assert pool.shape == (EXPERTS, min(2 * round(0.25 * count), bank.selection_scores(torch.zeros(1, INTERMEDIATE, HIDDEN)).shape[1] - count))
    for e in range(EXPERTS):
        assert not bool(torch.isin(pool[e], bank.selection_positions()[e]).any())
    with torch.no_grad():
        bank.values.copy_(1.0 + torch.rand(bank.values.shape, generator=torch.Generator().manual_seed(1)))
    sums = []
    for step in (1, 2):
        routing = routing_of(11, 2, 20 + step, dtype=torch.float32)
        x = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(30 + step))
        bank(x, BankCall(routing, ForwardContext())).sum().backward()
        sums.append(measured_gradient(bank).clone())
        if step == 1:
            bank.selector.after_step(bank, 1, 10, SINGLE)  # no update at step 1: the sum goes on
            assert torch.equal(bank.selector.pool, pool)
    assert not torch.equal(sums[1], sums[0])  # step 2 added to step 1's
    score = sums[1].norm(dim=2)
    moves = round(0.25 * count)
    expected_grown = torch.sort(torch.gather(pool, 1, torch.topk(score, moves, dim=1).indices), dim=1).values
    before = bank.selection_positions().clone()
    bank.selector.after_step(bank, 2, 10, SINGLE)
    after = bank.selection_positions()
    for e in range(EXPERTS):
        grown = after[e][~torch.isin(after[e], before[e])]
        assert torch.equal(torch.sort(grown).values, expected_grown[e])
        assert not bool(torch.isin(bank.selector.pool[e], after[e]).any())  # the new pool: none owned
    assert not torch.equal(bank.selector.pool, pool) and bank.selector.pool_gradient.abs().sum() == 0
    assert_bank_exact(bank)


@pytest.mark.parametrize("cells", [5000, 1 << 24], ids=["permutation", "rejection"])
def test_spiel_candidates_are_distinct_unowned_and_reproducible(cells):
    from srde_plugins.deltas.sparse.learned import _draw_unowned

    generator = torch.Generator().manual_seed(0)
    owned = torch.sort(torch.randperm(cells, generator=generator)[:1000] if cells < 1 << 20 else
                       torch.randint(0, cells, (1000,), generator=generator).unique()).values
    draws = [_draw_unowned(owned, cells, 700, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    pool = draws[0]
    assert pool.numel() == 700 and bool((pool[1:] > pool[:-1]).all()) and pool.min() >= 0 and pool.max() < cells
    assert not bool(torch.isin(pool, owned).any())
    # every free cell when fewer are free than asked
    small = _draw_unowned(torch.arange(0, 10, 2), 10, 8, torch.Generator().manual_seed(1))
    assert small.tolist() == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("grow", ["dense", "candidates"])
def test_spiel_on_a_bank_that_owns_every_position_does_not_move(grow):
    bank = make_bank({"name": "spiel", "every": 1, "grow": grow}, density=1.0)
    before = bank.entry_positions().clone()
    routing = routing_of(7, 2, 1, dtype=torch.float32)
    bank(torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(2)), BankCall(routing, ForwardContext())).sum().backward()
    bank.selector.after_step(bank, 1, 10, SINGLE)
    assert torch.equal(bank.entry_positions(), before) and bank.count == INTERMEDIATE * HIDDEN


def test_gumbel_noise_is_standard_gumbel_fresh_per_step_and_the_same_within_one():
    """Over 30 steps of a 3 x 3072 logit grid (276,480 draws) the noise has the moments of Gumbel(0, 1):
    mean the Euler-Mascheroni constant, variance pi^2/6, P(g <= 0) = 1/e. Each tolerance is more than
    7 standard errors of its estimate (and the seed is fixed), so the test cannot flake; -log(E) with
    the sign flipped has mean -0.577, far outside."""
    bank = make_bank({"name": "gumbel_topk", "candidates": 3}, 64, 64, density=0.25)
    selector: GumbelTopK = bank.selector
    assert selector.logits.shape == (EXPERTS, 3 * position_count(0.25, 64, 64)) == (3, 3072)
    draws = torch.stack([selector.gumbel(step).double() for step in range(30)])  # [steps, E, C]
    n = draws.numel()
    euler_gamma = 0.5772156649015329
    assert float(draws.mean()) == pytest.approx(euler_gamma, abs=0.02)  # standard error 0.0024
    assert float(draws.var()) == pytest.approx(math.pi**2 / 6, abs=0.05)  # standard error 0.0066
    assert float((draws <= 0).double().mean()) == pytest.approx(math.exp(-1.0), abs=0.005)  # standard error 0.0009
    assert float((draws <= 2).double().mean()) == pytest.approx(math.exp(-math.exp(-2.0)), abs=0.005)
    assert n == 30 * 3 * 3072
    # a function of the step: the same draw again, another one at the next step, independent of it
    assert torch.equal(selector.gumbel(7), draws[7].to(selector.logits.dtype))  # drawn again from the step's seed
    a, b = draws[:-1].reshape(-1), draws[1:].reshape(-1)
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(correlation) < 0.02  # standard error 0.002
    assert not torch.equal(draws[0, 0], draws[0, 1])  # experts draw their own noise


def set_deltas(bank, deltas: torch.Tensor) -> None:
    """Set the values so that the bank's entries ``value * sigmoid(importance)`` are ``deltas``."""
    with torch.no_grad():
        bank.values.copy_(deltas / torch.sigmoid(bank.importance))


def one_step(bank, step: int, seed: int) -> None:
    routing = routing_of(11, 2, seed, dtype=bank.values.dtype)
    x = torch.randn(11, bank.in_features, generator=torch.Generator().manual_seed(seed), dtype=bank.values.dtype)
    bank(x, BankCall(routing, ForwardContext())).sum().backward()
    bank.selector.after_step(bank, step, 10, SINGLE)


@pytest.mark.parametrize("grow", ["dense", "candidates"])
def test_spiel_keeps_a_large_converged_entry_and_drops_a_small_moving_one(grow):
    """SpIEL (and RigL) drop the entries of smallest |phi|: an entry at 2.0 that no longer changes
    stays, one at 0.06 that is still moving goes."""
    bank = make_bank({"name": "spiel", "every": 1, "fraction": 0.25, "grow": grow}, 4, 4, density=0.25)
    assert bank.count == 4  # one entry moves per update
    set_deltas(bank, torch.tensor([[2.0, 1.0, 1.0, 0.5]]).expand(EXPERTS, 4))
    one_step(bank, 1, 1)  # drops the 0.5 entries, grows one at 0 per expert
    positions = bank.entry_positions().clone()
    deltas = bank.effective_values().detach()
    converged = deltas.eq(2.0).nonzero()[:, 1].view(EXPERTS, 1)
    grown = deltas.eq(0.0).nonzero()[:, 1].view(EXPERTS, 1)
    moving = deltas.eq(1.0)
    with torch.no_grad():  # the next window: 2.0 stays where it was, the others move
        values = deltas.clone()
        values[moving] = 1.5
        values.scatter_(1, grown, 0.06)
    set_deltas(bank, values)
    converged_at = torch.gather(positions, 1, converged)
    grown_at = torch.gather(positions, 1, grown)
    bank.zero_grad()
    one_step(bank, 2, 2)
    after = bank.entry_positions()
    for e in range(EXPERTS):
        assert bool(torch.isin(converged_at[e], after[e]).all())
        assert not bool(torch.isin(grown_at[e], after[e]).any())
    assert bool((bank.effective_values().detach().abs().max(dim=1).values == 2.0).all())


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_spiel_ag_picks_its_candidates_by_gradient_magnitude_and_accumulates_them(block):
    """SpIEL-AG (the default pool): the candidates are the unowned cells of largest |G_e| in the
    first step after an update; their gradient is summed from that step to the next update, whose
    growth takes the largest sums; the next window picks a new pool."""
    out, inp = 8, 8
    bank = make_bank({"name": "spiel", "every": 2, "fraction": 0.25, "candidates": 2}, out, inp,
                     density=0.25, block=block).double()
    selector: SpIEL = bank.selector
    assert selector.pool_choice == "gradient" and not bool(selector.pool_ready)
    owned = bank.selection_positions().clone()
    grid = bank.selection_scores(torch.zeros(1, out, inp)).shape[1]
    size = selector.pool.shape[1]
    assert size == min(2 * round(0.25 * owned.shape[1]), grid - owned.shape[1]) and size >= 2
    set_deltas(bank, 1.0 + torch.rand(bank.values.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))

    def dense_gradient(seed):
        routing = routing_of(13, 2, seed)
        x = torch.randn(13, inp, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        grad = torch.randn(13, out, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
        bank(x, BankCall(routing, ForwardContext())).backward(grad)
        dense = torch.zeros(EXPERTS, out, inp, dtype=torch.float64, requires_grad=True)
        y = (routing.weights[..., None].detach() * torch.einsum("tkoi,ti->tko", dense[routing.experts], x)).sum(1)
        return torch.autograd.grad((y * grad).sum(), dense)[0]

    first = dense_gradient(3)
    selector.after_step(bank, 1, 10, SINGLE)
    score = bank.selection_scores(first).scatter(1, owned, -math.inf)
    expected_pool = torch.sort(torch.topk(score, size, dim=1).indices, dim=1).values
    assert bool(selector.pool_ready) and torch.equal(selector.pool, expected_pool)
    for e in range(EXPERTS):
        assert not bool(torch.isin(selector.pool[e], owned[e]).any())
    second = dense_gradient(5)
    entries = bank.selection_entries(selector.pool)  # [E, C, k]
    total = first + second
    torch.testing.assert_close(measured_gradient(bank), torch.gather(total.reshape(EXPERTS, -1), 1, entries.flatten(1)).view(entries.shape))
    pool = selector.pool.clone()
    sums = torch.gather(total.reshape(EXPERTS, -1), 1, entries.flatten(1)).view(entries.shape).norm(dim=2)
    moves = round(0.25 * owned.shape[1])
    expected_grown = torch.sort(torch.gather(pool, 1, torch.topk(sums, moves, dim=1).indices), dim=1).values
    selector.after_step(bank, 2, 10, SINGLE)
    after = bank.selection_positions()
    for e in range(EXPERTS):
        grown = after[e][~torch.isin(after[e], owned[e])]
        assert torch.equal(torch.sort(grown).values, expected_grown[e])
    assert not bool(selector.pool_ready) and selector.pool_gradient.abs().sum() == 0
    dense_gradient(7)  # the next window's first step picks a new pool, none of it owned
    selector.after_step(bank, 3, 10, SINGLE)
    assert bool(selector.pool_ready)
    for e in range(EXPERTS):
        assert not bool(torch.isin(selector.pool[e], after[e]).any())


def relaxation_gradient(selector: GumbelTopK, bank, step: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit gradient of ``sum(scale * weights)`` at ``step`` and the sigmoid relaxation it
    should equal at temperature ``tau`` (returned as a function of tau via the soft mask)."""
    selector.after_step(bank, step, total, SINGLE)
    scale = selector.entry_scale(bank)
    weights = torch.randn(scale.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((scale * weights).sum(), selector.logits)
    return grad, weights


@pytest.mark.parametrize("harden_at", [0.5, 6])
def test_gumbel_temperature_reaches_its_end_when_the_mask_hardens(harden_at):
    """The temperature schedule runs from the phase's start to ``harden_at``: the last masked step
    uses its end value (exponential 1.0 -> 0.1: 0.1, not 0.32 halfway through the phase)."""
    bank = make_bank({"name": "gumbel_topk", "candidates": 4, "harden_at": harden_at})
    selector: GumbelTopK = bank.selector
    randomise(bank, 1)
    count = selector.count
    for step, want in ((0, 1.0), (5, 0.1), (2, 0.1 ** (2 / 5))):  # 12 steps; hardening after step 6
        grad, weights = relaxation_gradient(selector, bank, step, 12)
        perturbed = selector.logits.detach() + selector.gumbel(step)
        ranked = torch.sort(perturbed, dim=1, descending=True).values
        soft = torch.sigmoid((perturbed - (ranked[:, count - 1 : count] + ranked[:, count : count + 1]) / 2) / want)
        torch.testing.assert_close(grad, weights * soft * (1 - soft) / want, rtol=1e-5, atol=1e-7)
    assert not selector.hardened(bank)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_gumbel_candidates_the_noise_did_not_pick_still_learn_their_values_and_then_their_logits(block):
    """Straight through the mask for the values: a candidate that is not chosen this step still
    gets its entries' gradient (times sigmoid(importance)), so it gains value and then logit
    gradient; with value_gradient = "chosen" it gets none."""
    results = {}
    for mode in ("candidates", "chosen"):
        bank = make_bank({"name": "gumbel_topk", "candidates": 4, "value_gradient": mode} if mode == "chosen"
                         else {"name": "gumbel_topk", "candidates": 4}, block=block)
        selector: GumbelTopK = bank.selector
        selector.logits.requires_grad_(True)
        selector.after_step(bank, 1, 10, SINGLE)
        hard = selector.entry_scale(bank).detach()
        routing = routing_of(17, 2, 4, dtype=torch.float32)
        x = torch.randn(17, bank.in_features, generator=torch.Generator().manual_seed(5))
        grad = torch.randn(17, bank.out_features, generator=torch.Generator().manual_seed(6))
        y = bank(x, BankCall(routing, ForwardContext()))
        assert y.abs().max() == 0  # every value starts at 0
        y.backward(grad)
        unpicked = hard == 0
        value_grad = bank.values.grad.reshape(*hard.shape, -1).abs().sum(-1)
        results[mode] = value_grad[unpicked]
        # the entries' gradient at every candidate, from the dense reference
        dense = torch.zeros(EXPERTS, bank.out_features, bank.in_features, requires_grad=True)
        ref = (routing.weights[..., None].detach() * torch.einsum("tkoi,ti->tko", dense[routing.experts], x)).sum(1)
        (entries,) = torch.autograd.grad((ref * grad).sum(), dense)
        cells = bank.selection_entries(bank.selection_positions())  # [E, C, k]
        at_entries = torch.gather(entries.reshape(EXPERTS, -1), 1, cells.flatten(1)).view(bank.values.shape)
        if mode == "candidates":
            torch.testing.assert_close(bank.values.grad, at_entries * torch.sigmoid(bank.importance.detach()), rtol=1e-5, atol=1e-6)
            # one step later the unchosen candidates have values, and so logit gradient
            with torch.no_grad():
                bank.values.sub_(0.1 * bank.values.grad.sign())
            selector.logits.grad = None
            bank(x, BankCall(routing_of(17, 2, 4, dtype=torch.float32), ForwardContext())).backward(grad)
            assert bool((selector.logits.grad[unpicked] != 0).all())
    assert bool((results["candidates"] > 0).all())
    assert bool((results["chosen"] == 0).all())
