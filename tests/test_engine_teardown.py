"""Phase transitions: a finished phase's engine session is torn down and freed before the next
phase builds its own (two optimisers with their state would not fit next to a 14B base), and the
DeepSpeed engine keeps the experts in float32.

* a torch session's optimiser (and its state) is garbage once the session closes;
* a one-process DeepSpeed ZeRO-2 and ZeRO-3 session's engine and optimiser likewise (in a
  subprocess: DeepSpeed joins a process group);
* a DeepSpeed config that turns bf16 on at ZeRO-2 (which casts every parameter, the experts' too)
  is refused in one line, exit 2.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from conftest import RECIPES, REPO
from test_engines import Tiny, big_gradient_step, session


def test_a_closed_torch_session_frees_its_optimiser():
    model, sess = session(1.0)
    big_gradient_step(model, sess)
    optimizer = weakref.ref(sess.optimizer)
    assert sess.optimizer.state  # the moments exist
    sess.close()
    gc.collect()
    assert optimizer() is None, "the optimiser (and its moments) outlived the session"
    assert all(p.grad is None for p in model.parameters())


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import gc, sys, types, weakref
    import torch
    sys.path.insert(0, {tests!r})
    from test_engines import Tiny
    from srde_core.dist import SINGLE
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe
    from srde_core.train.driver import TrainingTarget
    from srde_core.train.engine import OptimizerSpec

    recipe = load_recipe({recipe!r}, load_plugins(), ["engine.zero_stage=" + sys.argv[1], 'engine.one_process="zero"'])
    run = types.SimpleNamespace(recipe=recipe, dist=SINGLE, device=torch.device("cpu"), log=print)
    engine = recipe.engine.build()
    engine.setup(run)
    spec = OptimizerSpec(lr=0.1, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, schedule=lambda s: 1.0)
    refs = []
    for phase in range(2):  # two phases in a row, as Phase 1 then the joint phase
        model = Tiny()
        target = TrainingTarget(model, list(model.parameters()), model.state_dict, model.load_state_dict)
        sess = engine.start(target, spec, run)
        with sess.micro_step(True):
            sess.backward(sess.forward(input_ids=torch.full((2, 4), 1.0), attention_mask=None).pow(2).sum())
        sess.step()
        assert all(p.dtype == torch.float32 for p in target.parameters)
        refs.append((weakref.ref(sess.ds), weakref.ref(sess.optimizer)))
        sess.close()
        del sess
        gc.collect()
        alive = [i for i, (ds, opt) in enumerate(refs) if ds() is not None or opt() is not None]
        print("ALIVE", phase, alive)
        assert not alive, f"sessions {{alive}} outlived close()"
    print("OK")
""")


@pytest.mark.parametrize("stage", [2, 3])
def test_a_closed_deepspeed_session_frees_its_engine_and_optimiser(stage, tmp_path):
    script = DEEPSPEED_SCRIPT.format(tests=str(REPO / "tests"), recipe=str(RECIPES / "deepspeed_micro.toml"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", script, str(stage)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=480)
    assert result.returncode == 0 and "OK" in result.stdout, (result.stdout + result.stderr)[-4000:]


def test_bf16_in_a_user_deepspeed_config_at_zero2_is_refused_in_one_line(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"bf16": {"enabled": True}}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "srde_core.cli", "run", str(RECIPES / "deepspeed_micro.toml"),
         "--set", f"engine.config={json.dumps(str(config))}", "--set", f"cache_dir={json.dumps(str(tmp_path / 'c'))}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "engine.config" in lines[0] and "bf16" in lines[0] and "ZeRO-2" in lines[0]
    assert not (tmp_path / "runs").exists()
