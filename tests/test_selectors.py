"""Position selectors: the contract (shape, unique, sorted, in range) and each selector's rule."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from srde_plugins.deltas.sparse import MagnitudeSelectorParams
from srde_plugins.deltas.sparse.selectors import MagnitudeSelector, RandomSelector


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_contract(positions: torch.Tensor, num_experts: int, count: int, numel: int) -> None:
    assert positions.dtype == torch.long
    assert positions.shape == (num_experts, count)
    assert positions.min() >= 0 and positions.max() < numel
    if count > 1:
        assert bool((positions[:, 1:] > positions[:, :-1]).all())  # sorted and unique per expert


@pytest.mark.parametrize("name", ["magnitude", "random"])
def test_registered_selectors_honour_the_contract(plugins, name):
    component = plugins.registries["selector"].get(name)
    selector = component.build(component.params())
    weight = torch.randn(12, 30, generator=generator())
    for experts, count in [(1, 1), (4, 17), (3, 360)]:
        check_contract(selector.select(weight, experts, count, generator()), experts, count, weight.numel())


def test_magnitude_shared_picks_the_largest_entries_for_every_expert():
    weight = torch.randn(10, 20, generator=generator())
    positions = MagnitudeSelector("shared").select(weight, 3, 15, generator())
    expected = torch.sort(torch.argsort(weight.abs().flatten(), descending=True)[:15]).values
    for row in positions:
        assert torch.equal(row, expected)


def test_magnitude_uses_absolute_values():
    weight = torch.zeros(2, 4)
    weight[0, 1] = -9.0  # largest magnitude, negative
    weight[1, 3] = 5.0
    weight[1, 0] = 0.1
    positions = MagnitudeSelector("shared").select(weight, 1, 2, generator())
    assert positions.tolist() == [[1, 7]]


def test_magnitude_interleaved_deals_ranks_round_robin():
    weight = torch.arange(1.0, 25.0).view(4, 6)  # flat index i has magnitude i + 1
    positions = MagnitudeSelector("interleaved").select(weight, 3, 4, generator())
    # ranks (largest first): 23, 22, 21, 20, ...; rank r goes to expert r mod 3
    assert positions.tolist() == [[14, 17, 20, 23], [13, 16, 19, 22], [12, 15, 18, 21]]
    flat = positions.flatten()
    assert len(set(flat.tolist())) == flat.numel()  # disjoint
    assert set(flat.tolist()) == set(range(12, 24))  # exactly the top 12


def test_magnitude_interleaved_needs_enough_entries():
    with pytest.raises(ValueError, match="distinct positions"):
        MagnitudeSelector("interleaved").select(torch.randn(3, 3), 4, 3, generator())


def test_magnitude_is_deterministic_and_ignores_the_generator():
    weight = torch.randn(16, 16, generator=generator())
    a = MagnitudeSelector("interleaved").select(weight, 4, 10, generator(1))
    b = MagnitudeSelector("interleaved").select(weight, 4, 10, generator(2))
    assert torch.equal(a, b)


def test_magnitude_of_a_bfloat16_weight():
    weight = torch.randn(8, 8, generator=generator()).to(torch.bfloat16)
    positions = MagnitudeSelector("shared").select(weight, 2, 5, generator())
    check_contract(positions, 2, 5, 64)


def test_magnitude_params_validate_the_assignment():
    assert MagnitudeSelectorParams().assignment == "shared"
    with pytest.raises(ValidationError):
        MagnitudeSelectorParams(assignment="disjoint")


def test_random_is_reproducible_from_the_generator():
    weight = torch.randn(20, 30)
    a = RandomSelector().select(weight, 4, 50, generator(7))
    b = RandomSelector().select(weight, 4, 50, generator(7))
    c = RandomSelector().select(weight, 4, 50, generator(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # experts draw independently


def test_random_does_not_depend_on_the_weight_values():
    a = RandomSelector().select(torch.randn(20, 30), 2, 40, generator(3))
    b = RandomSelector().select(torch.zeros(20, 30), 2, 40, generator(3))
    assert torch.equal(a, b)


def test_random_can_take_every_position():
    positions = RandomSelector().select(torch.randn(3, 5), 2, 15, generator())
    assert positions.tolist() == [list(range(15))] * 2


@pytest.mark.parametrize("large", [False, True])
def test_random_positions_are_uniform(monkeypatch, large):
    """Every position is about equally likely, in the permutation and the sampling regime."""
    if large:
        monkeypatch.setattr(RandomSelector, "PERMUTATION_LIMIT", 0)
    numel, count, experts = 200, 20, 500
    positions = RandomSelector().select(torch.zeros(10, 20), experts, count, generator(5))
    check_contract(positions, experts, count, numel)
    hits = torch.bincount(positions.flatten(), minlength=numel).float()
    expected = experts * count / numel  # 50 per position
    # chi-square with 199 degrees of freedom: mean 199, sd ~20; 300 is far out in the tail
    chi2 = ((hits - expected) ** 2 / expected).sum().item()
    assert chi2 < 300
    # and not biased towards low or high indices
    assert abs(hits[:100].sum().item() - hits[100:].sum().item()) < 0.1 * experts * count


def test_selectors_reject_bad_requests():
    weight = torch.randn(4, 4)
    for selector in (MagnitudeSelector(), RandomSelector()):
        with pytest.raises(ValueError, match="count"):
            selector.select(weight, 2, 17, generator())
        with pytest.raises(ValueError, match="count"):
            selector.select(weight, 2, 0, generator())
        with pytest.raises(ValueError, match="2-D"):
            selector.select(torch.randn(16), 2, 3, generator())
