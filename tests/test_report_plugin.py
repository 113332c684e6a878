"""The tables of `srde eval` and of a run's loss summary are `report` components: the built-in
`tables` prints what the evaluation holds, and a plugin's report prints after it (name order)."""

from __future__ import annotations

import io
import types

from rich.console import Console

from srde_core.evaluate.report import print_tables

ROW = {"tokens": 4, "base": 1.5, "srde": 1.25, "delta": -0.25}
LOSSES = {"examples_per_domain": 1, "domains": ["a"], "loss": {"domains": {"a": ROW}, "all": ROW}}


def _printed(plugins, result) -> str:
    buffer = io.StringIO()
    print_tables(types.SimpleNamespace(plugins=plugins), result, Console(file=buffer, width=100))
    return buffer.getvalue()


def test_the_builtin_tables_print_what_the_evaluation_holds():
    from srde_core.plugins import load_plugins

    text = _printed(load_plugins(), LOSSES)
    assert "Eval loss per domain (1 examples per domain)" in text and "1.2500" in text and "-0.2500" in text
    assert "accuracy" not in text and "routing" not in text  # a loss summary: the loss table alone
    acc = {"examples": 1, "base_correct": 0, "srde_correct": 1, "base": 0.0, "srde": 1.0, "delta": 1.0}
    full = {**LOSSES, "max_new_tokens": 8, "accuracy": {"domains": {"a": acc}, "all": acc}, "routing": None}
    text = _printed(load_plugins(), full)
    assert "Answer accuracy per domain (greedy, ≤8 new tokens)" in text and "+100.0 pp" in text
    assert text.rstrip().endswith("routing: the run has no experts")


def test_a_plugin_report_prints_after_the_builtin_tables():
    from srde_core.hookspecs import hookimpl
    from srde_core.params import NoParams
    from srde_core.plugins import load_plugins

    @hookimpl
    def srde_register(registry):
        registry.add("report", "worst_domain", lambda params: lambda result: [
            "worst domain: " + max(result["loss"]["domains"], key=lambda d: result["loss"]["domains"][d]["srde"])],
            NoParams, "The domain with the highest SRDE loss.")

    plugins = load_plugins(extra=[("worst-domain", types.SimpleNamespace(srde_register=srde_register))])
    assert not plugins.broken, plugins.broken_note()
    text = _printed(plugins, LOSSES)
    assert text.index("Eval loss per domain") < text.index("worst domain: a")
