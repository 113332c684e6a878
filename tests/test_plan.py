"""`srde plan`: the memory plan against the peak memory of a real training step on CPU (within
15%), its counts against a model built for real, the engine's sharding, and the command line."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from srde_core.cli import main
from srde_core.model.build import attach_recipe_experts, model_class
from srde_core.plan import meta_model, model_config, plan_memory
from srde_core.plugins import load_plugins
from srde_core.recipe import load_recipe
from srde_core.train.losses import LossInputs

HERE = Path(__file__).parent
MICRO = str(HERE / "recipes" / "micro.toml")
TINY = str(HERE.parent / "recipes" / "tiny.toml")
VOCAB = 32768  # the mistral-common v3 tokenizer of both recipes


class PeakMemory(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive, and their peak.

    Every op's output storage is counted once while a tensor on it lives (views share it);
    storages that existed before (``existing``: parameters, buffers, optimiser state) are not."""

    def __init__(self, existing):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.external:
                continue
            if key not in self.live:
                self.live[key] = [storage.nbytes(), 0]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.live[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def measured_peak(recipe) -> int:
    """Peak bytes of the second training step (AdamW state exists) of the recipe's last phase,
    every position labelled: parameters, buffers and optimiser state plus the step's peak."""
    config = model_config(recipe, tokenizer_vocab=VOCAB)
    torch.manual_seed(0)
    model = model_class(recipe.model.architecture)._from_config(config, dtype=getattr(torch, recipe.model.dtype))
    if recipe.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    experts = attach_recipe_experts(model, recipe)
    phase = recipe.phases[-1]
    optimizer = torch.optim.AdamW(list(experts.trainable_parameters().values()), lr=1e-3)
    loss_fn = next(choice for choice in phase.losses if choice.name == "lm").build()
    ids = torch.randint(0, VOCAB, (phase.batch_size, recipe.data.seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        with experts.forward_context():
            hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
        loss_fn(LossInputs(hidden=hidden, lm_head=model.get_output_embeddings(), labels=ids, batch={})).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    existing = [*model.parameters(), *model.buffers(),
                *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))]
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in existing}
    with PeakMemory(existing) as memory:
        step()
    assert memory.current == 0, "the step left tensors alive: the accounting is off"
    return sum(resident.values()) + memory.peak


def recipe_of(path, *overrides):
    return load_recipe(path, load_plugins(), list(overrides))


LAST_LAYER_ONLY = 'srde.layout={name="uniform", num_experts=4, top_k=2, layers=[1]}'

CASES = {
    "micro": (MICRO,),
    "micro, lm in chunks of 16": (MICRO, 'phases.experts.losses=[{name="lm", chunk_tokens=16}]'),
    "micro, gradient checkpointing": (MICRO, "model.gradient_checkpointing=true",
                                      'phases.experts.losses=[{name="lm", chunk_tokens=16}]'),
    "micro, experts on the last layer only": (MICRO, LAST_LAYER_ONLY,
                                              'phases.experts.losses=[{name="lm", chunk_tokens=16}]'),
    "tiny, batch 4": (TINY, "phases.experts.batch_size=4"),
    "tiny, batch 4, lm in chunks of 64": (TINY, "phases.experts.batch_size=4",
                                          'phases.experts.losses=[{name="lm", chunk_tokens=64}]'),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_within_15_percent_of_the_measured_peak(case):
    recipe = recipe_of(*CASES[case])
    plan = plan_memory(recipe, tokenizer_vocab=VOCAB)
    measured = measured_peak(recipe)
    rows = ", ".join(f"{r.name} {r.bytes / 2**20:.2f}" for r in plan.rows)
    assert abs(plan.total - measured) <= 0.15 * measured, (
        f"{case}: planned {plan.total / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB "
        f"(ratio {plan.total / measured:.3f}); plan rows (MiB): {rows}"
    )


@pytest.mark.parametrize("delta", [
    'srde.delta={name="sparse"}',  # magnitude, shared: positions stored once
    'srde.delta={name="sparse", selector={name="magnitude", assignment="interleaved"}}',
    'srde.delta={name="sparse", selector="random"}',
    'srde.delta={name="lora"}',
    'srde.delta={name="sparse", block=[4, 4]}',
    'srde.delta={name="sparse", block=[4, 4], selector="random"}',
])
def test_the_meta_model_counts_what_a_real_model_holds(delta):
    recipe = recipe_of(MICRO, delta)
    config = model_config(recipe, tokenizer_vocab=VOCAB)
    meta, meta_experts = meta_model(recipe, config)
    real = model_class(recipe.model.architecture)._from_config(config)
    real_experts = attach_recipe_experts(real, recipe)
    assert next(meta.parameters()).is_meta

    def counts(model, experts):
        trainable = sum(p.numel() for p in experts.trainable_parameters().values())
        return (sum(p.numel() for p in model.parameters()), trainable,
                sum(b.numel() * b.element_size() for b in model.buffers()))

    assert counts(meta, meta_experts) == counts(real, real_experts)


def test_layers_before_the_first_one_with_experts_keep_no_activations():
    every = plan_memory(recipe_of(MICRO), tokenizer_vocab=VOCAB).row("activations").bytes
    last = plan_memory(recipe_of(MICRO, LAST_LAYER_ONLY), tokenizer_vocab=VOCAB).row("activations").bytes
    assert last * 2 == every  # micro has 2 layers: experts on layer 1 only need its activations alone


class WithEngine:
    """``recipe`` with another engine table (a ZeRO engine's fields, read generically)."""

    def __init__(self, recipe, name, **fields):
        self._recipe = recipe
        self.engine = type("Choice", (), {"name": name, "params": type("Params", (), fields)()})()

    def __getattr__(self, name):
        return getattr(self._recipe, name)


def test_zero_stages_shard_optimiser_state_gradients_and_parameters():
    recipe = recipe_of(MICRO)
    one = plan_memory(recipe, gpus=4, tokenizer_vocab=VOCAB)
    for stage, sharded in ((1, {"optimiser state"}), (2, {"optimiser state", "gradients"}),
                           (3, {"optimiser state", "gradients", "trainable params", "frozen params (float32)"})):
        zero = plan_memory(WithEngine(recipe, "deepspeed", zero_stage=stage), gpus=4, tokenizer_vocab=VOCAB)
        for row in one.rows:
            expected = row.bytes // 4 if row.name in sharded else row.bytes
            assert zero.row(row.name).bytes == expected, (stage, row.name)
    offload = plan_memory(WithEngine(recipe, "deepspeed", zero_stage=2, offload_optimizer=True), gpus=2,
                          tokenizer_vocab=VOCAB)
    assert offload.row("optimiser state").bytes == 0 and offload.notes


def test_srde_plan_prints_the_max_preset_offline_and_says_whether_it_fits(capsys):
    assert main(["plan", "recipes/max.toml" if Path("recipes/max.toml").exists() else "srde:max",
                 "--gpu-memory", "1000"]) == 0
    out = capsys.readouterr().out
    assert "frozen params (bfloat16)" in out and "fits" in out and "total" in out


def test_srde_plan_without_a_config_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "hub.toml"
    recipe.write_text('name = "hub"\n[model]\nname_or_path = "nobody/not-cached-anywhere"\n'
                      '[data.generate]\nexamples_per_domain = 10\n[[phases]]\nname = "experts"\ntrainer = "joint"\nsteps = 1\n')
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "[model.config]" in err and "model.name_or_path" in err
    assert main(["plan", MICRO, "--gpus", "0"]) == 2


@pytest.mark.parametrize("delta", [
    'srde.delta={name="sparse", selector={name="gumbel_topk"}}',
    'srde.delta={name="sparse", selector={name="spiel"}}',
    'srde.delta={name="sparse", block=[4, 4], selector={name="gumbel_topk"}}',
    'srde.delta={name="sparse", block=[4, 4], selector={name="spiel"}}',
])
def test_the_meta_model_counts_a_learned_selectors_state(delta):
    """A learned selector's parameters count as trainable (gumbel's logits over its candidates) and
    its buffers are there; positions are planned per expert (where learned positions end up), so
    the meta model holds at least the real one's buffers."""
    recipe = recipe_of(MICRO, delta)
    config = model_config(recipe, tokenizer_vocab=VOCAB)
    meta, meta_experts = meta_model(recipe, config)
    real = model_class(recipe.model.architecture)._from_config(config)
    real_experts = attach_recipe_experts(real, recipe)
    trainable = [sum(p.numel() for p in e.trainable_parameters().values()) for e in (meta_experts, real_experts)]
    assert trainable[0] == trainable[1]
    names = [{n for n, _ in m.named_buffers() if ".selector." in n} for m in (meta, real)]
    assert names[0] == names[1] and names[0]
    buffers = [sum(b.numel() * b.element_size() for b in m.buffers()) for m in (meta, real)]
    assert buffers[0] >= buffers[1]
