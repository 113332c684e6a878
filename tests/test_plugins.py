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


def test_listing_and_validating_do_not_import_torch(micro_recipe):
    import subprocess

    code = (
        "import io, sys, contextlib\n"
        "from srde_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['list-plugins']) == 0\n"
        f"    assert main(['validate', {str(micro_recipe)!r}]) == 0\n"
        f"    assert main(['show', {str(micro_recipe)!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"
