"""Recipe layering: extends chains, deep merge, --set overrides, resolution, show."""

from __future__ import annotations

import json
import textwrap

import pytest

from srde_core.cli import main
from srde_core.errors import RecipeError
from srde_core.recipe import load_recipe
from srde_core.recipe.layers import parse_value, read_layers


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_micro_recipe_resolves_with_defaults_filled(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins)
    assert [p.name for p in recipe.phases] == ["base", "experts"]
    assert recipe.phases[1].trainer.name == "joint"
    assert recipe.phases[1].losses[1].name == "load_balance" and recipe.phases[1].losses[1].weight == 0.01
    assert recipe.phases[0].max_grad_norm == 1.0  # schema default
    assert recipe.srde.layout.params.num_experts == 4
    assert recipe.resolved["srde"]["delta"] == recipe.srde.delta.describe()
    assert recipe.resolved["srde"]["delta"]["selector"] == {"name": "magnitude", "assignment": "shared"}
    assert recipe.srde.delta.params.selector.name == "magnitude"  # nested under the delta that uses it
    assert (recipe.engine.name, recipe.srde.router.name, recipe.srde.combine.name) == ("torch", "topk", "weighted_sum")
    assert recipe.phases[1].sampler.name == "shuffled"


def test_trainer_arguments_are_nested_under_the_trainer(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins, ['phases.base.trainer={ name = "base_pretrain", cache = false }'])
    assert recipe.phases[0].trainer.params.cache is False
    assert recipe.resolved["phases"][0]["trainer"] == {"name": "base_pretrain", "cache": False}


def test_a_recipe_resolves_again_from_its_resolved_form(plugins, micro_recipe):
    from srde_core.recipe.resolve import recipe_from_resolved

    recipe = load_recipe(micro_recipe, plugins, ['srde.delta.selector={ name = "magnitude", assignment = "interleaved" }'])
    again = recipe_from_resolved(recipe.resolved, micro_recipe, plugins)
    assert again.resolved == recipe.resolved and again.fingerprint() == recipe.fingerprint()


def test_presets_run_by_name_and_extend_by_name(tmp_path, plugins):
    from srde_core.recipe.layers import preset_names

    assert {"tiny", "max", "balanced", "fast"} <= set(preset_names())
    assert load_recipe("srde:tiny", plugins).name == "tiny"
    child = write(tmp_path / "mine.toml", 'extends = "srde:tiny"\nname = "mine"\n')
    recipe = load_recipe(child, plugins)
    assert recipe.name == "mine" and recipe.model.config["hidden_size"] == 256
    with pytest.raises(RecipeError, match="no preset 'srde:tiyn' \\(did you mean 'tiny'\\?\\)"):
        load_recipe("srde:tiyn", plugins)


def test_extends_chain_merges_tables_and_replaces_arrays(tmp_path, plugins, micro_recipe):
    write(tmp_path / "base.toml", f'extends = "{micro_recipe}"\nseed = 5\n[model]\ndtype = "bfloat16"\n')
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\nname = "child"\n[model.config]\nhidden_size = 32\n')
    recipe = load_recipe(child, plugins)
    assert (recipe.name, recipe.seed, recipe.model.dtype) == ("child", 5, "bfloat16")
    assert recipe.model.config["hidden_size"] == 32 and recipe.model.config["num_hidden_layers"] == 2


def test_set_overrides_are_toml_typed_and_address_phases_by_index_or_name(plugins, micro_recipe):
    recipe = load_recipe(
        micro_recipe, plugins,
        ["phases.experts.steps=9", "phases.0.lr=0.5", "model.dtype=bfloat16", "srde.projections=['up_proj']"],
    )
    assert recipe.phases[1].steps == 9 and recipe.phases[0].lr == 0.5
    assert recipe.model.dtype == "bfloat16" and recipe.srde.projections == ("up_proj",)


def test_provenance_names_the_file_that_set_the_key(tmp_path, plugins, micro_recipe):
    write(tmp_path / "base.toml", f'extends = "{micro_recipe}"\n[[phases]]\nname = "x"\ntrainer = "joint"\nsteps = -1\n')
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\nname = "c"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(child, plugins)
    assert info.value.source.endswith("base.toml") and info.value.key == "phases[0].steps"


def test_parse_value_is_toml_with_bare_word_fallback():
    assert parse_value("3") == 3 and parse_value("1e-3") == 0.001 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"x"') == "x" and parse_value("bfloat16") == "bfloat16"


def test_layers_record_every_file_of_the_chain(tmp_path, micro_recipe):
    child = write(tmp_path / "c.toml", f'extends = "{micro_recipe}"\n')
    assert [p.name for p in read_layers(child).files] == ["micro.toml", "c.toml"]


def test_fingerprint_changes_with_any_setting(plugins, micro_recipe):
    a = load_recipe(micro_recipe, plugins)
    b = load_recipe(micro_recipe, plugins, ["phases.experts.lr=0.02"])
    assert a.fingerprint() == load_recipe(micro_recipe, plugins).fingerprint() != b.fingerprint()


def test_show_prints_resolved_toml_and_json(micro_recipe, capsys):
    assert main(["show", str(micro_recipe), "--set", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "seed = 3" in out and "[[phases]]" in out and 'name = "joint"' in out
    assert main(["show", str(micro_recipe), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["phases"][1]["scheduler"]["name"] == "warmup_cosine"


def test_validate_succeeds_on_every_shipped_recipe(capsys):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(shipped.glob("*.toml"))
    assert {r.name for r in recipes} >= {"tiny.toml", "max.toml", "balanced.toml", "fast.toml"}
    ablations = sorted((shipped / "ablations").glob("*.toml")) + sorted((shipped / "ablations" / "conventions").glob("*.toml"))
    assert {r.stem for r in ablations} >= {"sparse", "peft_lora", "peft_lora_free", "full_ft", "spiel_block"}
    for recipe in recipes + ablations:
        if recipe.name.startswith("_"):
            continue
        assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err


def test_a_component_table_naming_another_component_replaces_the_old_one(tmp_path, plugins, micro_recipe):
    child = write(tmp_path / "c.toml", f'extends = "{micro_recipe}"\n[srde]\ndelta = {{ name = "lora", rank = 4 }}\n')
    recipe = load_recipe(child, plugins)
    assert recipe.srde.delta.name == "lora" and recipe.srde.delta.params.rank == 4
    same = write(tmp_path / "s.toml", f'extends = "{micro_recipe}"\n[srde]\ndelta = {{ name = "sparse", init_importance = 1.0 }}\n')
    merged = load_recipe(same, plugins).srde.delta.params
    assert merged.density == 0.05 and merged.init_importance == 1.0  # same component: arguments merge


@pytest.mark.parametrize("suite, preset, prefix", [("ablations", "tiny.toml", "ablation-"),
                                                   ("ablations/conventions", "conventions.toml", "ablation-conventions-")])
def test_every_ablation_keeps_its_presets_base_so_the_cached_base_is_shared(plugins, suite, preset, prefix):
    """The ablation table compares expert phases on one base: every ablation's base phase, model,
    tokenizer and data must be its preset's (else it would train, and be compared on, another base)."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "recipes"
    reference = load_recipe(shipped / preset, plugins).resolved
    for path in sorted((shipped / suite).glob("*.toml")):
        recipe = load_recipe(path, plugins).resolved
        assert recipe["name"] == f"{prefix}{path.stem}", path.name
        for key in ("model", "tokenizer", "data"):
            assert recipe[key] == reference[key], (path.name, key)
        assert recipe["phases"][0] == reference["phases"][0], path.name
