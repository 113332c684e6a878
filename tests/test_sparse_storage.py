"""How the sparse bank stores its positions: once when the experts share them, int32 index
structures, and adapters saved either way (older ones with int64 ``[E, P]`` positions) still load."""

from __future__ import annotations

import torch

from test_exactness import assert_matches, build_layer

from srde_plugins.deltas.sparse.kernels import CSRStructure, build_csr_structure


def stored_buffers(bank) -> dict[str, torch.Tensor]:
    return dict(bank.named_buffers(recurse=False))


def test_shared_positions_and_structures_are_stored_once():
    mlp = build_layer("sparse", "magnitude", 16, 40, 4, 2)  # assignment "shared"
    bank = mlp.banks["up_proj"]
    buffers = stored_buffers(bank)
    assert buffers["positions"].shape == (1, bank.count)
    for name in CSRStructure.INDEX_FIELDS:
        assert buffers[f"csr_{name}"].shape[0] == 1 and buffers[f"csr_{name}"].dtype == torch.int32
    # callers still see [E, P] long positions and [E, ...] structures
    assert bank.positions.shape == (4, bank.count) and bank.positions.dtype == torch.long
    assert bank.positions is bank.positions  # one view object while the positions do not change
    assert bank.structure().col.shape == (4, bank.count)
    assert bank.state_dict()["positions"].shape == (1, bank.count)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    assert_matches(mlp, x, rtol=1e-5, atol=1e-5)


def test_positions_of_their_own_are_stored_per_expert():
    bank = build_layer("sparse", "random", 16, 40, 4, 2).banks["up_proj"]
    assert stored_buffers(bank)["positions"].shape == (4, bank.count)
    assert stored_buffers(bank)["csr_col"].shape == (4, bank.count)


def test_build_csr_structure_shares_one_row_for_equal_rows():
    positions = torch.tensor([[1, 5, 7]]).expand(3, 3)
    s = build_csr_structure(positions, 3, 4)
    assert s.col.shape == (3, 3) and s.col.stride(0) == 0 and s.transpose_order.dtype == torch.int32


def test_an_adapter_with_int64_positions_per_expert_still_loads():
    source = build_layer("sparse", "magnitude", 16, 24, 3, 2, seed=1)
    target = build_layer("sparse", "magnitude", 16, 24, 3, 2, seed=2)
    target.base.load_state_dict(source.base.state_dict())
    target.router.load_state_dict(source.router.state_dict())
    old_format = {
        key: (value.expand(3, -1).long().contiguous() if key.endswith("positions") else value)
        for key, value in source.banks.state_dict().items()
    }
    assert old_format["up_proj.positions"].shape == (3, source.banks["up_proj"].count)
    target.banks.load_state_dict(old_format)
    assert stored_buffers(target.banks["up_proj"])["positions"].shape[0] == 1  # stored once again
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(target(x), source(x))


def test_shared_and_own_positions_load_into_each_other():
    shared = build_layer("sparse", "magnitude", 16, 24, 3, 2, seed=1)
    own = build_layer("sparse", "random", 16, 24, 3, 2, seed=1)
    own.banks.load_state_dict(shared.banks.state_dict())
    assert torch.equal(own.banks["down_proj"].positions, shared.banks["down_proj"].positions)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(own(x), shared(x))
    source = build_layer("sparse", "random", 16, 24, 3, 2, seed=5)
    shared.banks.load_state_dict(source.banks.state_dict())
    assert stored_buffers(shared.banks["gate_proj"])["positions"].shape[0] == 3
    assert torch.equal(shared.banks["gate_proj"].positions, source.banks["gate_proj"].positions)
