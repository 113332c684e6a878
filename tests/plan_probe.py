"""Measure the tensor peak of training steps of a recipe's phase through its engine, as a run does
(``python tests/plan_probe.py RECIPE PHASE [--set K=V ...]``; prints ``PLAN <bytes>`` and
``MEASURED <bytes>``). Used by tests/test_plan.py in a process of its own (DeepSpeed joins a group).

Every tensor storage created from before the engine session starts (ZeRO's flat partitions and
master copy, optimiser state, buckets, activations) until after the second optimiser step is
counted while it lives, on top of the parameters and buffers the model held before; every
position is labelled (the plan's assumption)."""

from __future__ import annotations

import contextlib
import io
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_plan import PeakMemory  # noqa: E402

from srde_core.dist import Dist  # noqa: E402
from srde_core.model.architectures import text_config  # noqa: E402
from srde_core.model.build import attach_recipe_experts, enable_checkpointing, model_class  # noqa: E402
from srde_core.plugins import load_plugins  # noqa: E402
from srde_core.recipe import load_recipe  # noqa: E402
from srde_core.train.driver import TrainingTarget  # noqa: E402
from srde_core.train.engine import OptimizerSpec  # noqa: E402
from srde_core.train.losses import LossInputs  # noqa: E402
from srde_plugins.runtime.plan import model_config, plan_memory  # noqa: E402


def main(argv: list[str]) -> None:
    path, phase_name, *rest = argv
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    recipe = load_recipe(path, load_plugins(), overrides)
    phase = next(p for p in recipe.phases if p.name == phase_name)
    plan = plan_memory(recipe, gpus=1, phase=phase_name, device="cpu")
    config = model_config(recipe)
    run = types.SimpleNamespace(recipe=recipe, dist=Dist.from_env(), device=torch.device("cpu"),
                                log=lambda *a, **k: None, console=io.StringIO())
    engine = recipe.engine.build()
    engine.setup(run)
    torch.manual_seed(0)
    with engine.model_init_context() or contextlib.nullcontext():  # ZeRO-3 partitions the base as it is built
        model = model_class(recipe.model.architecture)._from_config(config, dtype=getattr(torch, recipe.model.dtype))
    if recipe.model.gradient_checkpointing:
        enable_checkpointing(model)
    experts = attach_recipe_experts(model, recipe, gather=engine.gather)
    model.train()
    trainable = list(experts.trainable_parameters().values())
    target = TrainingTarget(model, trainable, experts.adapter.state_dict, experts.adapter.load_state_dict)
    loss_fn = next(choice for choice in phase.losses if choice.name == "lm").build()
    vocab = int(text_config(config).vocab_size)
    ids = torch.randint(0, min(vocab, 1000), (phase.batch_size, recipe.data.seq_len), generator=torch.Generator().manual_seed(0))
    existing = [*model.parameters(), *model.buffers()]
    resident = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in existing}.values())
    with PeakMemory(existing) as memory:
        session = engine.start(target, OptimizerSpec.from_phase(phase), run)
        for _ in range(2):
            with session.micro_step(True):
                with session.autocast(), experts.forward_context():
                    hidden = session.forward(input_ids=ids, attention_mask=torch.ones_like(ids))
                    loss = loss_fn(LossInputs(hidden=hidden, lm_head=model.get_output_embeddings(), labels=ids, batch={}))
                session.backward(loss)
            session.step()
    print("PLAN", plan.allocated)
    print("MEASURED", resident + memory.peak)
    print("ROWS", ", ".join(f"{r.name} {r.bytes}" for r in plan.rows))


if __name__ == "__main__":
    main(sys.argv[1:])
