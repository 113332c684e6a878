"""The plugin manager: discovery through entry points, isolation of broken plugins."""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import textwrap

import pytest

from srde_core.errors import PluginError
from srde_core.plugins import load_plugins, provided_by, require_healthy

GOOD = '''
"""A good plugin."""
from srde_core.hookspecs import hookimpl

def flat(params, total_steps):
    """Flat."""
    return lambda step: 1.0

@hookimpl
def srde_register(registry):
    registry.add("scheduler", "flat_{tag}", flat)
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("demo_plugin_")]:
        del sys.modules[name]


def write(plugin_dir, name: str, source: str) -> metadata.EntryPoint:
    (plugin_dir / f"{name}.py").write_text(textwrap.dedent(source))
    return metadata.EntryPoint(name=name, value=name, group="srde")


def test_builtin_plugins_are_discovered_through_the_entry_point_group(plugins):
    names = {p.name for p in plugins.plugins}
    assert {"schedules", "losses", "trainers", "sparse-delta", "layouts", "routing", "runtime", "data"} <= names
    assert all(p.distribution == "srde" for p in plugins.plugins if p.name in {"losses", "trainers"})
    assert not plugins.broken, plugins.broken


def test_builtins_cover_every_core_kind(plugins):
    from srde_core.defaults import CORE_KINDS

    for kind in CORE_KINDS:
        assert plugins.registries[kind].names(), kind


def test_import_error_is_reported_and_others_still_load(plugin_dir):
    good = write(plugin_dir, "demo_plugin_good", GOOD.format(tag="a"))
    broken = write(plugin_dir, "demo_plugin_broken", "import does_not_exist_anywhere\n")
    result = load_plugins(entry_points=[good, broken])
    by_name = {p.name: p for p in result.plugins}
    assert "ModuleNotFoundError" in by_name["demo_plugin_broken"].error
    assert by_name["demo_plugin_good"].error is None
    assert "flat_a" in result.registries["scheduler"]
    assert "demo_plugin_broken" in result.broken_note()


def test_misspelled_hook_name_makes_the_plugin_broken(plugin_dir):
    source = """
    from srde_core.hookspecs import hookimpl

    @hookimpl
    def srde_regster(registry):
        pass
    """
    ep = write(plugin_dir, "demo_plugin_typo", source)
    result = load_plugins(entry_points=[ep])
    (info,) = [p for p in result.plugins if p.name == "demo_plugin_typo"]
    assert "srde_regster" in info.error


def test_registration_failure_registers_nothing_from_that_plugin(plugin_dir):
    source = """
    from srde_core.hookspecs import hookimpl

    def flat(params, total_steps):
        return lambda step: 1.0

    @hookimpl
    def srde_register(registry):
        registry.add("scheduler", "half_done", flat)
        raise RuntimeError("boom")
    """
    ep = write(plugin_dir, "demo_plugin_half", source)
    result = load_plugins(entry_points=[ep])
    assert "half_done" not in result.registries["scheduler"]
    (info,) = [p for p in result.plugins if p.name == "demo_plugin_half"]
    assert info.error == "RuntimeError: boom"


def test_two_plugins_providing_one_name_is_an_error_naming_both(plugin_dir):
    first = write(plugin_dir, "demo_plugin_one", GOOD.format(tag="same"))
    second = write(plugin_dir, "demo_plugin_two", GOOD.format(tag="same"))
    result = load_plugins(entry_points=[first, second])
    (info,) = [p for p in result.plugins if p.error]
    assert "provided twice: by 'demo_plugin_one' and by 'demo_plugin_two'" in info.error
    assert result.registries["scheduler"].get("flat_same").provider == "demo_plugin_one"


def test_provided_by_lists_kinds_and_names(plugins):
    assert ("scheduler", "warmup_cosine") in provided_by(plugins, "schedules")
    assert ("schedule", "linear") in provided_by(plugins, "schedules")
    assert ("kind", "engine") in provided_by(plugins, "srde-core")


def test_required_plugin_that_is_broken_stops_with_a_clear_message(plugin_dir):
    broken = write(plugin_dir, "demo_plugin_gone", "raise ImportError('needs CUDA')\n")
    result = load_plugins(entry_points=[broken])
    with pytest.raises(PluginError, match="required plugin 'demo_plugin_gone' failed to load: ImportError: needs CUDA"):
        require_healthy(result, ["demo_plugin_gone"], source="r.toml")
    with pytest.raises(PluginError, match="required plugin 'nope' is not installed"):
        require_healthy(result, ["nope"], source="r.toml")


def test_every_hookspec_is_documented_and_says_when_it_is_called():
    from srde_core import hookspecs

    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("srde_")]
    assert len(specs) >= 10
    for spec in specs:
        doc = spec.__doc__ or ""
        assert "Called" in doc or "called" in doc, spec.__name__
        firstresult = spec.srde_spec.get("firstresult", False)
        assert ("firstresult" in doc) == firstresult, spec.__name__


def test_every_builtin_plugin_has_a_summary_line_and_a_test(plugins):
    from pathlib import Path

    tests = " ".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    modules = {ep.name: ep.value for ep in metadata.entry_points(group="srde")}
    for info in plugins.plugins:
        if info.distribution != "srde":
            continue
        assert info.summary, info.name
        module = modules[info.name]  # e.g. srde_plugins.deltas.sparse
        assert module in tests, f"plugin '{info.name}' ({module}) has no test that imports it"


def test_listing_and_showing_do_not_import_torch(micro_recipe):
    import subprocess

    code = (
        "import io, sys, contextlib\n"
        "from srde_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['list-plugins']) == 0\n"
        f"    assert main(['show', {str(micro_recipe)!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"


HIJACK = '''
"""A plugin that also ships a loss named like a built-in."""
from srde_core.hookspecs import hookimpl

def zero(params):
    return lambda inputs: inputs.hidden.sum() * 0.0

@hookimpl
def srde_register(registry):
    registry.add("loss", "lm", zero{override})
    registry.add("loss", "zero_{tag}", zero)
'''

JOINT = '''
"""A third-party trainer named like the built-in one."""
from srde_core.hookspecs import hookimpl

def joint(params):
    raise AssertionError("never built")

@hookimpl
def srde_register(registry):
    registry.add("trainer", "joint", joint)
'''


def _with_builtins(*extra: metadata.EntryPoint) -> list[metadata.EntryPoint]:
    return [*metadata.entry_points(group="srde"), *extra]


def _only_srde_entry_points(monkeypatch, plugins_module, everything) -> None:
    """The plugin manager sees ``everything`` as group ``srde``; other groups (torch's) are untouched."""
    real = metadata.entry_points
    monkeypatch.setattr(plugins_module.metadata, "entry_points",
                        lambda group=None, **kw: everything if group == "srde" else real(group=group, **kw) if group else real(**kw))


def test_a_plugin_sorting_first_cannot_take_over_a_builtin_loss(plugin_dir):
    ep = write(plugin_dir, "aaa_demo_plugin_hijack", HIJACK.format(override="", tag="a"))
    result = load_plugins(entry_points=_with_builtins(ep))
    by_name = {p.name: p for p in result.plugins}
    assert by_name["losses"].error is None
    assert {"lm", "load_balance", "router_z"} <= set(result.registries["loss"].names())
    assert result.registries["loss"].get("lm").provider == "losses"
    error = by_name["aaa_demo_plugin_hijack"].error
    assert "\n" not in error and "loss 'lm' is provided twice: by 'losses' and by 'aaa_demo_plugin_hijack'" in error
    assert "override=True" in error
    assert "zero_a" not in result.registries["loss"]  # a broken plugin registers nothing


def test_a_third_party_trainer_named_joint_leaves_the_builtin_in_charge(plugin_dir):
    ep = write(plugin_dir, "aaa_demo_plugin_joint", JOINT)
    result = load_plugins(entry_points=_with_builtins(ep))
    assert result.registries["trainer"].get("joint").provider == "trainers"
    (info,) = result.broken
    assert info.name == "aaa_demo_plugin_joint" and "trainer 'joint' is provided twice" in info.error


def test_an_explicit_override_replaces_the_builtin_and_the_header_says_so(plugin_dir, micro_recipe):
    from srde_core.recipe import load_recipe

    ep = write(plugin_dir, "aaa_demo_plugin_override", HIJACK.format(override=", override=True", tag="b"))
    result = load_plugins(entry_points=_with_builtins(ep))
    assert not result.broken, result.broken
    assert result.registries["loss"].get("lm").provider == "aaa_demo_plugin_override"
    recipe = load_recipe(micro_recipe, result)
    lines = [line for group in result.hook.srde_run_header(recipe=recipe) for line in (group or [])]
    overrides = [line for line in lines if line.startswith("override:")]
    assert overrides == ["override: loss 'lm' is plugin 'aaa_demo_plugin_override''s, in place of the built-in from 'losses'"]
    untouched = load_recipe(micro_recipe, load_plugins())
    assert not [line for group in load_plugins().hook.srde_run_header(recipe=untouched) for line in (group or [])
                if line.startswith("override:")]


def test_an_override_of_a_third_party_name_is_still_a_clash(plugin_dir):
    first = write(plugin_dir, "demo_plugin_first", GOOD.format(tag="x"))
    second = write(plugin_dir, "demo_plugin_second", GOOD.format(tag="x").replace("flat)", "flat, override=True)"))
    result = load_plugins(entry_points=[first, second])
    assert result.registries["scheduler"].get("flat_x").provider == "demo_plugin_first"
    assert [p.name for p in result.broken] == ["demo_plugin_second"]


def test_a_recipe_needing_a_broken_plugins_component_exits_2_before_any_work(plugin_dir, micro_recipe, tmp_path, monkeypatch, capsys):
    import srde_core.plugins as plugins_module
    from srde_core.cli import main

    ep = write(plugin_dir, "aaa_demo_plugin_needed", HIJACK.format(override="", tag="c"))
    everything = _with_builtins(ep)
    _only_srde_entry_points(monkeypatch, plugins_module, everything)
    recipe = tmp_path / "needs.toml"
    recipe.write_text(f'extends = "{micro_recipe}"\noutput_dir = "{tmp_path / "runs"}"\n'
                      '[[phases]]\nname = "experts"\ntrainer = "joint"\nsteps = 2\nlosses = ["zero_c"]\n')
    for command in ("validate", "run"):
        assert main([command, str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unknown loss 'zero_c'" in err[0] and "aaa_demo_plugin_needed" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_validate_names_the_clash_in_one_warning_line_and_keeps_the_builtin(plugin_dir, micro_recipe, monkeypatch, capsys):
    import srde_core.plugins as plugins_module
    from srde_core.cli import main

    ep = write(plugin_dir, "aaa_demo_plugin_clash", HIJACK.format(override="", tag="d"))
    everything = _with_builtins(ep)
    _only_srde_entry_points(monkeypatch, plugins_module, everything)
    assert main(["validate", str(micro_recipe)]) == 0
    out = capsys.readouterr()
    assert ": ok" in out.out
    (line,) = out.err.strip().splitlines()
    assert line.startswith("srde: warning: plugin 'aaa_demo_plugin_clash' failed to load: PluginError: loss 'lm' is provided twice")
