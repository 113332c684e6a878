"""Run by tests/test_scale_delta.py under torchrun (2 processes, gloo): the `scale` delta on layers
that share banks (share_every = 2), over a base that the deepspeed engine's ZeRO-3 partitions, held
to the dense reference before and after one optimiser step. Writes ``result-<rank>.json`` into the
directory given as the only argument."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from srde_testkit import input_ids, tiny_config

from srde_core.model.attach import attach_srde
from srde_core.plugins import load_plugins
from srde_core.recipe import resolve_component
from srde_core.testing import assert_model_exact
from srde_plugins.runtime import DeepSpeedParams
from srde_plugins.runtime.deepspeed import make_engine


def main(out: Path) -> None:
    import transformers

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank = torch.distributed.get_rank()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 2**31 - 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    plugins = load_plugins()
    build = lambda kind, spec: resolve_component(plugins, kind, spec).build()  # noqa: E731
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = transformers.LlamaForCausalLM(tiny_config("LlamaForCausalLM", num_hidden_layers=4))
    weight = model.model.layers[1].mlp.up_proj.weight
    partitioned = tuple(weight.shape) == (0,)
    engine = make_engine(DeepSpeedParams(zero_stage=3))
    experts = attach_srde(
        model, layout=build("layout", {"name": "uniform", "num_experts": 4, "top_k": 2, "share_every": 2}),
        delta_type=build("delta", {"name": "scale"}), router_type=build("router", "topk"),
        combine_type=build("combine", "weighted_sum"), seed=0, gather=engine.gather,
    )
    generator = torch.Generator().manual_seed(3)
    trainable = list(experts.trainable_parameters().values())
    with torch.no_grad():
        for p in trainable:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = input_ids(batch=2, length=6, seed=rank)
    scales = experts.banks()["group0"]["down_proj"].scales
    with engine.gather([scales]):
        before = scales.detach().clone()
    outputs = {}
    worst = assert_model_exact(experts, lambda: outputs.setdefault("y", ds(input_ids=ids).logits), tol=1e-5,
                               gather=engine.gather)
    ds.backward(outputs["y"].float().pow(2).mean())
    ds.step()
    with engine.gather([scales]):
        moved = float((scales.detach() - before).abs().max())
    after = assert_model_exact(experts, lambda: ds(input_ids=ids).logits, tol=1e-5, gather=engine.gather)
    (out / f"result-{rank}.json").write_text(json.dumps({
        "partitioned": partitioned, "banks": len(experts.banks()), "worst": max(worst.values()),
        "worst_after_step": max(after.values()), "moved": moved, "layers": sorted(worst),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
