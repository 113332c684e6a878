"""The `scale` delta ((IA)^3-style, W-dependent): exact against the dense reference, with each layer's
own live weight when layers share a bank, and with base weights an engine partitions (ZeRO-3)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from srde_testkit import input_ids, perturb, tiny_model

import srde_plugins.deltas.scale  # noqa: F401  (the plugin under test)
from srde_core.errors import SRDEError
from srde_core.model.attach import attach_srde
from srde_core.model.components import BankCall
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component
from srde_core.testing import assert_exact, assert_model_exact, build_layer

PLUGINS = load_plugins()


def component(kind: str, spec):
    return resolve_component(PLUGINS, kind, spec).build()


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("bias", [False, True])
def test_scale_delta_matches_the_reference(side, bias):
    assert_exact(component("delta", {"name": "scale", "side": side}), bias=bias, plugins=PLUGINS)


def test_scale_deltas_are_the_paper_s_rescaling_of_the_weight():
    mlp = build_layer({"name": "scale"}, plugins=PLUGINS)
    bank, weight = mlp.banks["down_proj"], mlp.base.down_proj.weight
    s = bank.scales[1].detach()
    # (IA)^3's l_ff rescales the input of the FFN's second projection: W_eff = W diag(1 + s)
    torch.testing.assert_close(weight + bank.delta_weight(1, weight=weight), weight * (1 + s)[None, :])
    with pytest.raises(ValueError, match="weight=W"):
        bank.delta_weight(1)


def attach(model, layout: dict, delta: dict, gather=None):
    return attach_srde(
        model, layout=component("layout", layout), delta_type=component("delta", delta),
        router_type=component("router", "topk"), combine_type=component("combine", "weighted_sum"),
        seed=0, gather=gather,
    )


@pytest.mark.parametrize("side", ["input", "output"])
def test_a_shared_scale_bank_scales_each_layer_s_own_weight(side):
    model = tiny_model("LlamaForCausalLM", num_hidden_layers=4).double()
    experts = attach(model, {"name": "uniform", "num_experts": 4, "top_k": 2, "share_every": 2},
                     {"name": "scale", "side": side})
    assert len(experts.banks()) == 2  # layers (0, 1) and (2, 3) share
    first, second = experts.layers[0], experts.layers[1]
    assert first.banks["up_proj"] is second.banks["up_proj"]
    assert not torch.equal(first.base.up_proj.weight, second.base.up_proj.weight)
    perturb(experts, seed=3, scale=0.5)
    worst = assert_model_exact(experts, lambda: model(input_ids=input_ids(batch=2, length=6)), tol=1e-10)
    assert sorted(worst) == [0, 1, 2, 3]


class Partitioned:
    """Base MLP weights as ZeRO-3 keeps them: empty (shape (0,)) except inside ``gather`` or while
    their module runs forward."""

    def __init__(self, model: nn.Module):
        self.full: dict[int, torch.Tensor] = {}
        self.gathers = 0
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(("gate_proj", "up_proj", "down_proj")):
                self.full[id(module.weight)] = module.weight.data
                module.weight.data = torch.empty(0, dtype=module.weight.dtype)
                module.register_forward_pre_hook(lambda m, args: self._fetch([m.weight]))
                module.register_forward_hook(lambda m, args, out: self._release([m.weight]))

    def _fetch(self, tensors):
        for t in tensors:
            if id(t) in self.full:
                t.data = self.full[id(t)]

    def _release(self, tensors):
        for t in tensors:
            if id(t) in self.full:
                t.data = torch.empty(0, dtype=t.dtype)

    @contextlib.contextmanager
    def gather(self, tensors):
        self.gathers += 1
        self._fetch(tensors)
        try:
            yield
        finally:
            self._release(tensors)


def test_layers_share_banks_over_partitioned_weights():
    """attach read a partitioned weight's shape outside the gather (``(0,)``) and refused to share."""
    model = tiny_model("LlamaForCausalLM", num_hidden_layers=4)
    partitioned = Partitioned(model)
    experts = attach(model, {"name": "uniform", "num_experts": 4, "top_k": 2, "share_every": 2},
                     {"name": "scale"}, gather=partitioned.gather)
    assert len(experts.banks()) == 2
    perturb(experts, seed=3, scale=0.5)
    ids = input_ids(batch=2, length=6)
    before = partitioned.gathers
    with torch.no_grad():
        out = model(input_ids=ids).logits  # the input-side scale bank reads its layer's weight, gathered
    assert torch.isfinite(out).all() and partitioned.gathers > before
    assert_model_exact(experts, lambda: model(input_ids=ids), tol=1e-5, gather=partitioned.gather)


def test_a_bank_that_reads_the_weight_gets_it_gathered_in_backward_too():
    mlp = build_layer({"name": "scale"}, plugins=PLUGINS, dtype=torch.float64)
    weight = mlp.base.down_proj.weight
    full = weight.data
    calls = []

    @contextlib.contextmanager
    def gather(tensors):
        calls.append(len(tensors))
        weight.data = full
        try:
            yield
        finally:
            weight.data = torch.empty(0, dtype=full.dtype)

    routing = mlp.router(torch.randn(5, 16, dtype=torch.float64))
    call = BankCall(routing, None, weight=weight, gather=gather)
    u = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    with gather([weight]):
        y = call.linear(u)
    y.sum().backward()  # the weight is partitioned again here: the backward gathers it itself
    torch.testing.assert_close(u.grad, torch.ones(5, 16, dtype=torch.float64) @ full)
    assert calls == [1, 1]


def test_a_mismatched_shared_shape_is_still_refused():
    model = tiny_model("LlamaForCausalLM", num_hidden_layers=2)
    model.model.layers[1].mlp.up_proj = nn.Linear(32, 40, bias=False)
    with pytest.raises(SRDEError, match="cannot share bank"):
        attach(model, {"name": "uniform", "num_experts": 2, "top_k": 1, "share_across_layers": True}, {"name": "scale"})


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_scale_delta_is_exact_under_zero3_with_shared_banks(tmp_path):
    """Two CPU processes, ZeRO-3 (every base weight partitioned), layers sharing banks."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_ddp import finish, free_ports
    from test_deepspeed import ENV

    tests = Path(__file__).parent
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(tests / "zero3_scale_exactness.py"), str(tmp_path)]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tests), ENV.get("PYTHONPATH", "")])}
    with (tmp_path / "torchrun.log").open("w") as log:
        launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    finish(launcher, tmp_path, timeout=480)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result-{rank}.json").read_text())
        assert result["partitioned"] and result["banks"] == 2 and result["layers"] == [0, 1, 2, 3]
        assert result["worst"] <= 1e-5 and result["worst_after_step"] <= 1e-5
        assert result["moved"] > 0  # the backward reached the scales through the gathered weight
