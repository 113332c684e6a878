"""The built-in engines (`srde_plugins.runtime`): the optimiser spec, clipping, checkpoint I/O."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from srde_core.dist import SINGLE, Dist
from srde_core.errors import SRDEError
from srde_core.recipe import load_recipe
from srde_core.train.driver import TrainingTarget
from srde_core.train.engine import OptimizerSpec, TorchEngine


class Tiny(nn.Module):
    """Just enough of an HF model for a session: ``base_model`` returning ``last_hidden_state``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    @property
    def base_model(self):
        return self

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(last_hidden_state=self.linear(input_ids))


def session(max_grad_norm, lr=0.1):
    model = Tiny()
    target = TrainingTarget(model, list(model.parameters()), model.state_dict, model.load_state_dict)
    spec = OptimizerSpec(lr=lr, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=max_grad_norm, schedule=lambda s: 1.0)
    run = types.SimpleNamespace(device=torch.device("cpu"), dist=SINGLE)
    return model, TorchEngine().start(target, spec, run)


def big_gradient_step(model, sess):
    x = torch.full((2, 4), 100.0)
    sess.backward(sess.forward(input_ids=x, attention_mask=None).pow(2).sum())
    return sess.step()


def test_max_grad_norm_zero_in_a_recipe_means_no_clipping(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins, ["phases.experts.max_grad_norm=0"])
    assert OptimizerSpec.from_phase(recipe.phases[1]).max_grad_norm is None
    assert OptimizerSpec.from_phase(recipe.phases[0]).max_grad_norm == 1.0


def test_unclipped_and_clipped_steps():
    model, sess = session(None)
    before = model.linear.weight.detach().clone()
    stats = big_gradient_step(model, sess)
    assert stats["grad_norm"] > 1000 and not torch.equal(model.linear.weight, before)  # a real update, not zero
    model, sess = session(1.0, lr=1.0)
    stats = big_gradient_step(model, sess)
    grads_were_clipped = stats["grad_norm"] > 1.0
    assert grads_were_clipped


def test_session_saves_and_loads_module_and_optimiser(tmp_path):
    model, sess = session(1.0)
    big_gradient_step(model, sess)
    sess.save(tmp_path, is_main=True)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "engine.pt"}
    weights = model.linear.weight.detach().clone()
    other, other_sess = session(1.0)
    other_sess.load(tmp_path)
    assert torch.equal(other.linear.weight, weights)
    state_a = sess.optimizer.state_dict()["state"][0]["exp_avg"]
    state_b = other_sess.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(state_a, state_b)


def test_a_replicated_session_writes_only_on_the_main_process(tmp_path):
    model, sess = session(1.0)
    sess.save(tmp_path, is_main=False)
    assert not any(tmp_path.iterdir())


def test_torch_engine_refuses_several_processes(plugins):
    component = plugins.registries["engine"].get("torch")
    engine = component.build(component.params())
    run = types.SimpleNamespace(dist=Dist(rank=0, world_size=2), device=torch.device("cpu"))
    with pytest.raises(SRDEError, match="use engine = \"ddp\""):
        engine.setup(run)


def test_engines_are_registered_by_the_runtime_plugin(plugins):
    from srde_plugins.runtime import DDPParams

    assert {"torch", "ddp"} <= set(plugins.registries["engine"].names())
    assert plugins.registries["engine"].get("ddp").params is DDPParams
