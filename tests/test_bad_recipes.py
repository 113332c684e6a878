"""The catalogue of bad recipes: each ends in ONE clear line naming the file and key, exit status 2."""

from __future__ import annotations

import pytest

from srde_core.cli import main

# (case id, recipe text ("{micro}" = path of the micro recipe), --set overrides, expected fragments)
CASES = [
    ("malformed-toml", 'extends = "{micro}"\nseed = = 3\n', [], ["bad.toml", "line 2", "invalid TOML"]),
    ("unknown-top-level-key", 'extends = "{micro}"\nseeed = 3\n', [], ["bad.toml", "seeed", "did you mean 'seed'"]),
    ("unknown-nested-key", 'extends = "{micro}"\n[model]\ndtyp = "float32"\n', [], ["model.dtyp", "did you mean 'dtype'"]),
    ("wrong-type", 'extends = "{micro}"\nseed = "zero"\n', [], ["bad.toml", "seed", "valid integer", "string 'zero'"]),
    ("out-of-range", 'extends = "{micro}"\n[data]\nseq_len = 2\n', [], ["data.seq_len", "greater than or equal to 8"]),
    ("component-arg-out-of-range", 'extends = "{micro}"\n[srde]\ndelta = {{ name = "sparse", density = 2.0 }}\n', [], ["srde.delta.density", "less than or equal"]),
    ("selector-phase-point", 'extends = "{micro}"\n[srde]\ndelta = {{ name = "sparse", selector = {{ name = "gumbel_topk", harden_at = 1.5 }} }}\n', [], ["srde.delta.selector.harden_at", "fraction of the phase must be in (0, 1]"]),
    ("unknown-component", 'extends = "{micro}"\n[srde]\ndelta = "sprase"\n', [], ["srde.delta.name", "unknown delta 'sprase'", "did you mean 'sparse'", "available:"]),
    ("unknown-component-arg", 'extends = "{micro}"\n[srde]\nlayout = {{ name = "uniform", num_expert = 4 }}\n', [], ["srde.layout.num_expert", "did you mean 'num_experts'"]),
    ("unknown-trainer", 'extends = "{micro}"\n[[phases]]\nname = "a"\ntrainer = "jiont"\nsteps = 1\n', [], ["phases[0].trainer.name", "unknown trainer 'jiont'", "did you mean 'joint'"]),
    ("unknown-trainer-key", 'extends = "{micro}"\n[[phases]]\nname = "a"\ntrainer = {{ name = "base_pretrain", cahce = true }}\nsteps = 1\n', [], ["phases[0].trainer.cahce", "unknown key 'cahce'", "did you mean 'cache'"]),
    ("trainer-key-in-the-phase", 'extends = "{micro}"\n[[phases]]\nname = "a"\ntrainer = "base_pretrain"\nsteps = 1\ncache = true\n', [], ["phases[0].cache", "an argument of trainer 'base_pretrain'", "phases[0].trainer"]),
    ("selector-outside-its-delta", 'extends = "{micro}"\n[srde]\nselector = "random"\n', [], ["srde.selector", "an argument of delta 'sparse'", "srde.delta"]),
    ("missing-required-key", 'extends = "{micro}"\n[[phases]]\nname = "a"\ntrainer = "joint"\n', [], ["phases[0].steps", "missing required key"]),
    ("unknown-loss", 'extends = "{micro}"\n[[phases]]\nname = "a"\ntrainer = "joint"\nsteps = 1\nlosses = ["lm", "load_balanse"]\n', [], ["phases[0].losses[1].name", "did you mean 'load_balance'"]),
    ("negative-loss-weight", 'extends = "{micro}"\n[[phases]]\nname = "a"\ntrainer = "joint"\nsteps = 1\nlosses = [{{ name = "lm", weight = -1 }}]\n', [], ["phases[0].losses[0].weight", ">= 0"]),
    ("duplicate-phase-name", 'extends = "{micro}"\n[[phases]]\nname = "a"\ntrainer = "joint"\nsteps = 1\n[[phases]]\nname = "a"\ntrainer = "joint"\nsteps = 1\n', [], ["phases[1].name", "duplicate phase name 'a'"]),
    ("wrong-enum", 'extends = "{micro}"\n[model]\ndtype = "fp8"\n', [], ["model.dtype", "'float32', 'bfloat16' or 'float16'"]),
    ("cross-field-check", 'extends = "{micro}"\n[srde]\nlayout = {{ name = "uniform", num_experts = 2, top_k = 3 }}\n', [], ["srde.layout", "top_k"]),
    ("component-without-name", 'extends = "{micro}"\n[srde]\nrouter = {{ gate = "softmax" }}\n', [], ["srde.router", "missing the router 'name'"]),
    ("unknown-engine", 'extends = "{micro}"\nengine = "dpp"\n', [], ["engine.name", "unknown engine 'dpp'", "did you mean 'ddp'"]),
    ("unknown-router-gate", 'extends = "{micro}"\n[srde]\nrouter = {{ name = "topk", gate = "softmax_k" }}\n', [], ["srde.router.gate", "softmax_topk"]),
    ("unknown-preset", 'extends = "srde:tinny"\nname = "x"\n', [], ["extends", "no preset 'srde:tinny'", "did you mean 'tiny'"]),
    ("unknown-plugin-settings", 'extends = "{micro}"\n[plugins.flash]\nenabled = true\n', [], ["plugins.flash", "unknown plugin settings table 'flash'"]),
    ("required-plugin-missing", 'extends = "{micro}"\n[plugins]\nrequire = ["srde-deepspeed"]\n', [], ["plugins.require", "required plugin 'srde-deepspeed' is not installed"]),
    ("extends-cycle", 'extends = "bad.toml"\nname = "x"\n', [], ["extends cycle", "bad.toml -> ", "bad.toml"]),
    ("missing-extends-file", 'extends = "nowhere.toml"\n', [], ["bad.toml", "extends", "'nowhere.toml' not found"]),
    ("extends-not-a-string", "extends = 3\n", [], ["bad.toml", "extends", "must be a string"]),
    ("set-unknown-key", 'extends = "{micro}"\n', ["phases.experts.stepz=3"], ["--set phases.experts.stepz=3", "phases[1].stepz", "did you mean 'steps'"]),
    ("set-wrong-toml-type", 'extends = "{micro}"\n', ["phases.0.steps='ten'"], ["--set phases.0.steps='ten'", "phases[0].steps", "valid integer"]),
    ("set-unknown-phase", 'extends = "{micro}"\n', ["phases.warmup.steps=3"], ["--set phases.warmup.steps=3", "no element named 'warmup'", "base, experts"]),
    ("set-without-equals", 'extends = "{micro}"\n', ["seed"], ["--set seed", "expected KEY=VALUE"]),
    ("name-is-a-path", 'extends = "{micro}"\nname = "../x"\n', [], ["bad.toml", "name", "must be one directory name inside output_dir"]),
    ("nan-learning-rate", 'extends = "{micro}"\n', ["phases.experts.lr=nan"], ["phases[1].lr", "must be a finite number (got nan)"]),
    ("infinite-loss-weight", 'extends = "{micro}"\n', ['phases.experts.losses=["lm", { name = "load_balance", weight = inf }]'], ["phases[1].losses[1].weight", "must be a finite number (got inf)"]),
    ("nan-schedule-start", 'extends = "{micro}"\n', ['phases.experts.losses=["lm", { name = "load_balance", weight = { name = "linear", start = nan, end = 0.1 } }]'], ["phases[1].losses[1].weight.start", "finite number"]),
    ("loss-twice", 'extends = "{micro}"\n', ['phases.experts.losses=["lm", "lm"]'], ["phases[1].losses[1]", "loss 'lm' appears twice"]),
    ("plugin-phase-typo", 'extends = "{micro}"\n[plugins.compile]\nphases = ["nope"]\n', [], ["bad.toml", "plugins.compile.phases[0]", "no phase named 'nope'", "base, experts"]),
    ("adaptive-start-above-density", 'extends = "{micro}"\n[plugins.adaptive_sparsity]\nenabled = true\ndensity = {{ name = "adaptive", start = 0.2, end = 0.01, steps = 4 }}\n', [], ["plugins.adaptive_sparsity.density.start", "above srde.delta.density = 0.05"]),
    ("spiel-with-adaptive-sparsity", 'extends = "{micro}"\n[srde]\ndelta = {{ name = "sparse", density = 0.05, selector = "spiel" }}\n[plugins.adaptive_sparsity]\nenabled = true\n', [], ["plugins.adaptive_sparsity", "adaptive sparsity and selector 'spiel'"]),
    ("layer-out-of-range", 'extends = "{micro}"\n[srde]\nlayout = {{ name = "uniform", num_experts = 2, top_k = 1, layers = [7] }}\n', [], ["bad.toml", "srde.layout.layers", "layer 7 is out of range for a model with 2 layers"]),
    ("share-group-out-of-range", 'extends = "{micro}"\n[srde]\nlayout = {{ name = "uniform", num_experts = 2, top_k = 1, share_groups = [[0, 5]] }}\n', [], ["bad.toml", "srde.layout.share_groups", "layer 5 is out of range"]),
    ("block-bigger-than-the-weight", 'extends = "{micro}"\n[srde]\ndelta = {{ name = "sparse", block = [512, 512] }}\n', [], ["bad.toml", "srde.delta.block", "does not tile a (128, 64) weight"]),
    ("unknown-architecture", 'extends = "{micro}"\n[model]\narchitecture = "Bogus"\n', [], ["bad.toml", "model.architecture", "unknown architecture 'Bogus'"]),
    ("not-a-causal-lm", 'extends = "{micro}"\n[model]\narchitecture = "BertModel"\n', [], ["bad.toml", "model.architecture", "is not a causal language model"]),
    ("unknown-attention", 'extends = "{micro}"\n[model]\nattn_implementation = "bogus"\n', [], ["bad.toml", "model.attn_implementation", "attn_implementation=\"bogus\"` is not supported"]),
    ("negative-size", 'extends = "{micro}"\n[model.config]\nhidden_size = -64\n', [], ["bad.toml", "model.config", "hidden_size must not be negative (got -64)"]),
    ("hf-name-without-format-hf", 'name = "x"\n[data]\nseq_len = 16\nhf_name = "some/dataset"\n[[phases]]\nname = "a"\ntrainer = "joint"\nsteps = 1\n', [], ["bad.toml", "data", "hf_name 'some/dataset' is read only with format = \"hf\""]),
    ("missing-data-source", 'name = "x"\n[data]\nseq_len = 16\n[[phases]]\nname = "a"\ntrainer = "joint"\nsteps = 1\n', [], ["bad.toml", "data", "train_files"]),
]


@pytest.mark.parametrize("case_id, text, overrides, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_gives_one_clear_line_and_exit_2(case_id, text, overrides, fragments, tmp_path, micro_recipe, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(text.format(micro=micro_recipe.as_posix()))
    args = ["validate", str(bad)]
    for override in overrides:
        args += ["--set", override]
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("srde: error: ")
    assert "Traceback" not in captured.err and captured.out == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_catalogue_covers_at_least_fifteen_failure_modes():
    assert len(CASES) >= 15


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("text", [
    '[srde]\ndelta = "nope"\n',
    '[srde]\nlayout = {{ name = "uniform", num_experts = 2, top_k = 1, layers = [7] }}\n',
    '[model]\nattn_implementation = "bogus"\n',
    '[srde]\ndelta = {{ name = "sparse", density = 0.05, selector = "spiel" }}\n[plugins.adaptive_sparsity]\nenabled = true\n',
], ids=["unknown-delta", "layer-out-of-range", "unknown-attention", "spiel-with-adaptive-sparsity"])
def test_run_refuses_a_bad_recipe_before_any_work(tmp_path, micro_recipe, capsys, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'extends = "{micro_recipe.as_posix()}"\n' + text.format())
    assert main(["run", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srde: error: ") and "bad.toml" in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".cache").exists()
