"""The GPU check kit (benchmarks/gpu/): its CPU smoke run end to end, the recipes and plans it
measures on a GPU, the report of variants that failed, and the wheel set it carries."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(KIT))

import check  # noqa: E402
import report  # noqa: E402
import wheels  # noqa: E402


def gpu_settings(**overrides):
    args = check.argparse.Namespace(cpu_smoke=False, layers=None, seq_len=None, warmup=None, steps=None,
                                    per_expert_batch=1, joint_batch=4)
    return {**check.settings(args), **overrides}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-kit")
    out = work / "out" / "check.json"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    done = subprocess.run([sys.executable, str(KIT / "check.py"), "--cpu-smoke", "--work", str(work), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, work


def test_smoke_measures_every_variant_and_phase(smoke):
    result, stdout, work = smoke
    s = result["settings"]
    assert s["mode"] == "cpu-smoke" and s["device"] == "cpu" and s["flash"] is False
    assert set(result["variants"]) == set(check.VARIANTS)
    for name, record in result["variants"].items():
        assert record["status"] == "ok", (name, record.get("error"))
        assert record["attention"] == "sdpa"
        phases = record["phases"]
        assert set(phases) == ({"pretrain"} if name == "phase1-sequential" else {"pretrain", "experts"})
        for phase, entry in phases.items():
            assert entry["steps"] == s["warmup"] + s["steps"] and entry["warmup_steps"] == s["warmup"]
            # every row is seq_len tokens, so a step reads exactly batch x accumulation x seq_len tokens
            assert entry["tokens_per_step"] == entry["batch_size"] * entry["grad_accum"] * s["seq_len"]
            assert entry["tokens_per_s"] > 0 and math.isfinite(entry["tokens_per_s"])
            assert entry["step_s"] > 0 and entry["first_step_s"] > 0
            assert math.isfinite(entry["loss"])
            assert entry["peak_allocated"] is None and entry["peak_reserved"] is None  # CPU: no CUDA counters
    experts = result["comparisons"]["phase1_parallel_vs_sequential"]["experts"]
    assert result["variants"]["headline"]["phases"]["pretrain"]["batch_size"] == experts * s["per_expert_batch"]
    assert result["variants"]["phase1-sequential"]["phases"]["pretrain"]["batch_size"] == s["per_expert_batch"]
    assert "wrote" in stdout and "Phase 1 parallel vs sequential" in stdout


def test_smoke_compares_against_the_plan(smoke):
    result, _, _ = smoke
    c = result["comparisons"]
    for key in ("flash_vs_sdpa", "compile_vs_eager"):
        assert c[key]["pretrain"] > 0 and c[key]["experts"] > 0
    p = c["phase1_parallel_vs_sequential"]
    assert p["speedup"] == pytest.approx(p["parallel_tokens_per_s"] / p["sequential_tokens_per_s"])
    rows = {(r["variant"], r["phase"]): r for r in result["memory"]}
    assert set(rows) == {(n, ph) for n, v in result["variants"].items() for ph in v["phases"]}
    for name, record in result["variants"].items():
        plan = record["plan"]
        assert plan["run"]["tensors"] >= max(ph["tensors"] for ph in plan["phases"].values()) > 0
        assert plan["run"]["total"] == plan["run"]["tensors"]  # on CPU: no CUDA context, no allocator margin
    # one expert's batch needs less than all experts' batch
    assert (result["variants"]["phase1-sequential"]["plan"]["phases"]["pretrain"]["tensors"]
            < result["variants"]["headline"]["plan"]["phases"]["pretrain"]["tensors"])


def test_gpu_recipes_are_max_at_full_width(tmp_path):
    s = gpu_settings(seq_len=64)  # the rows' length does not change the recipe's shape
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe

    data = (tmp_path / "all.jsonl", tmp_path / "one.jsonl")
    for path in data:
        path.write_text(json.dumps({"prompt": "a", "answer": "b", "domain": "domain0", "difficulty": 1}) + "\n")
    plugins = load_plugins()
    shipped = tomllib.loads((ROOT / "recipes" / "model_configs" / "mistralai--Ministral-3-14B-Reasoning-2512.toml")
                            .read_text())["text_config"]
    headline = load_recipe(check.variant_recipe("headline", s, tmp_path, data), plugins)
    text = headline.model.config["text_config"]
    assert text["num_hidden_layers"] == 4
    assert {k: text[k] for k in shipped if k != "num_hidden_layers"} == {k: v for k, v in shipped.items() if k != "num_hidden_layers"}
    assert headline.device == "cuda" and headline.model.dtype == "bfloat16" and headline.model.gradient_checkpointing
    assert headline.engine.name == "deepspeed"
    assert headline.engine.params.zero_stage == 2 and headline.engine.params.one_process == "zero"
    assert headline.settings("flash_attention").enabled
    assert headline.settings("compile").enabled and headline.settings("compile").backend == "inductor"
    pretrain, joint = headline.phases
    assert pretrain.trainer.name == "expert_pretrain" and pretrain.trainer.params.warm_start_router
    assert pretrain.batch_size == headline.srde.layout.params.num_experts and joint.batch_size == 4
    assert pretrain.steps == joint.steps == 7  # 2 warm-up + 5 measured
    sdpa = load_recipe(check.variant_recipe("sdpa", s, tmp_path, data), plugins)
    eager = load_recipe(check.variant_recipe("eager", s, tmp_path, data), plugins)
    assert not sdpa.settings("flash_attention").enabled and sdpa.settings("compile").enabled
    assert eager.settings("flash_attention").enabled and not eager.settings("compile").enabled
    sequential = load_recipe(check.variant_recipe("phase1-sequential", s, tmp_path, data), plugins)
    (only,) = sequential.phases
    assert only.batch_size == 1 and not only.trainer.params.warm_start_router
    assert sequential.data.train_files == [str(data[1])]

    plan = check.plan_of(tmp_path / "recipes" / "headline.toml")
    # 4 full-width layers, the 131k-token embeddings and LM head and the vision tower, in bf16
    assert plan["run"]["tensors"] > 5 * 2**30
    assert plan["run"]["total"] > plan["run"]["tensors"]  # a GPU recipe: context and allocator margin on top
    assert set(plan["phases"]) == {"pretrain", "experts"}


def test_report_records_variants_that_failed_or_ran_out_of_time(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    entry = {"steps": 3, "warmup_steps": 1, "batch_size": 8, "grad_accum": 1, "tokens_per_step": 256.0,
             "first_step_s": 2.0, "step_s": 0.5, "tokens_per_s": 512.0, "loss": 1.0, "compiled_graphs": 2,
             "peak_allocated": 3 * 2**30, "peak_reserved": 4 * 2**30, "device_used_at_end": None}
    (results / "headline.json").write_text(json.dumps(
        {"variant": "headline", "status": "ok", "attention": "sdpa", "phases": {"pretrain": entry}}))
    (results / "eager.json").write_text(json.dumps(  # killed inside its run: one phase written, still "running"
        {"variant": "eager", "status": "running", "attention": "sdpa", "phases": {"pretrain": {**entry, "tokens_per_s": 256.0}}}))
    plans = {n: {"run": {"tensors": 2**31, "total": 2**32, "peak_at": "x"},
                 "phases": {"pretrain": {"tensors": 2**31, "total": 2**32, "peak_at": "x"}}} for n in check.VARIANTS}
    launches = {"headline": ("ok", ""), "sdpa": ("failed", "Traceback ...\nRuntimeError: boom"),
                "eager": ("timeout", "eager 2/3"), "phase1-sequential": ("skipped", "out of time (540 s budget)")}
    result = report.report(gpu_settings(), 8, plans, launches, results, {"gpu": None, "versions": {"torch": "x"}})
    v = result["variants"]
    assert {n: v[n]["status"] for n in check.VARIANTS} == {
        "headline": "ok", "sdpa": "failed", "eager": "timeout", "phase1-sequential": "skipped"}
    assert "RuntimeError: boom" in v["sdpa"]["error"] and v["phase1-sequential"]["error"].startswith("out of time")
    assert result["comparisons"]["compile_vs_eager"]["pretrain"] == pytest.approx(2.0)  # the finished phase counts
    assert result["comparisons"]["flash_vs_sdpa"]["pretrain"] is None
    assert result["comparisons"]["phase1_parallel_vs_sequential"]["speedup"] is None
    (row,) = [r for r in result["memory"] if r["variant"] == "headline"]
    assert row["allocated_over_plan_tensors"] == pytest.approx(1.5) and row["reserved_over_plan_total"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "sdpa" in printed and "failed" in printed and "skipped" in printed


def test_wheel_set_is_what_the_image_lacks_and_pure_python():
    roots = {r.name for r in wheels.project_roots()}
    assert {"deepspeed", "mistral-common", "datasets", "pydantic", "transformers"} <= roots
    assert "flash-attn" not in roots
    found = wheels.closure(wheels.project_roots(), "3.12")
    assert "torch" not in found and "pydantic-core" in found and "tomli" not in found  # tomli: Python < 3.11 only
    assert "pycountry" in found  # asked for through an extra: mistral-common needs pydantic-extra-types[pycountry]
    image = wheels.image_packages()
    assert {"torch", "transformers", "numpy"} <= image and "deepspeed" not in image
    carried = wheels.choose(found, image)
    assert {"deepspeed", "mistral-common", "datasets", "pydantic", "pydantic-core", "hjson"} <= set(carried)
    assert "transformers" in carried  # pure Python: carried for an image whose version is too old
    assert "numpy" not in carried and "pyarrow" not in carried  # compiled and in the image
    assert all(version == found[name].version for name, version in carried.items())


def test_install_uses_the_folder_alone_and_adds_wheels_put_there(tmp_path):
    manifest = {"install": ["deepspeed>=0.19"], "carried": {"hjson": {"version": "3.1.0", "files": ["hjson-3.1.0-py3-none-any.whl"]}}}
    for name in ("hjson-3.1.0-py3-none-any.whl", "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"):
        with zipfile.ZipFile(tmp_path / name, "w"):
            pass
    first, second = wheels.install_command(tmp_path, manifest)
    assert first[:4] == [sys.executable, "-m", "pip", "install"]
    assert "--no-index" in first and first[first.index("--find-links") + 1] == str(tmp_path)
    assert first[first.index("-e") + 1] == str(ROOT) and first[-1] == "deepspeed>=0.19"
    assert "--no-deps" in second and second[-1].endswith("flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl")
    assert len(wheels.install_command(tmp_path, {**manifest, "carried": {"a": {"files": [
        "hjson-3.1.0-py3-none-any.whl", "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"]}}})) == 1
