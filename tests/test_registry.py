from __future__ import annotations

import pytest
from pydantic import Field

from srde_core.defaults import CORE_KINDS
from srde_core.errors import PluginError, RecipeError
from srde_core.params import NoParams, Params
from srde_core.registry import CALLABLE, Kind, KindRegistrar
from srde_core.registry import Registries as _Registries


def Registries() -> _Registries:  # noqa: N802  (registries with the core's kinds declared)
    registries = _Registries()
    for name, (summary, contract) in CORE_KINDS.items():
        registries.declare(Kind(name, summary, contract, "srde-core"))
    return registries


class DemoParams(Params):
    size: int = Field(1, ge=1)


def make(params):
    """Demo component."""
    return params.size


def test_the_core_declares_its_kinds_each_with_a_contract():
    registries = Registries()
    assert set(registries.kinds) == {
        "selector", "delta", "layout", "router", "combine", "loss", "scheduler", "schedule", "trainer", "engine", "sampler",
        "corpus", "source", "report", "tokenizer",
    }
    assert all(r.spec.contract is not None for r in registries.kinds.values())


def test_a_kind_declared_twice_names_both_declarers():
    registries = Registries()
    KindRegistrar(registries, "mine").add("reward", "Scores a rollout.", contract=CALLABLE)
    with pytest.raises(PluginError, match="declared twice: by 'mine' and by 'yours'"):
        KindRegistrar(registries, "yours").add("reward", "Another.")


def test_a_component_that_breaks_its_kinds_contract_fails_at_build():
    registries = Registries()
    registries.for_provider("demo").add("trainer", "numbers", make, DemoParams)
    with pytest.raises(PluginError, match=r"trainer 'numbers' \(plugin 'demo'\) built int, not a srde_core.train.trainer.Trainer"):
        registries["trainer"].get("numbers").build(DemoParams())


def test_lazy_factories_import_on_build_and_fail_in_one_line():
    registries = Registries()
    registries.for_provider("demo").add("loss", "lazy", "tests_missing_module:factory", NoParams, "Lazy.")
    component = registries["loss"].get("lazy")
    assert component.summary == "Lazy."
    with pytest.raises(PluginError, match="cannot import 'tests_missing_module:factory'"):
        component.build(NoParams())
    with pytest.raises(PluginError, match="not 'module:attr'"):
        registries.for_provider("demo").add("loss", "bad", "no_colon", NoParams)


def test_component_builds_with_validated_params_and_takes_summary_from_docstring():
    registries = Registries()
    registries.for_provider("demo").add("layout", "demo", make, DemoParams)
    component = registries["layout"].get("demo")
    assert component.summary == "Demo component."
    assert component.provider == "demo"
    assert component.params is DemoParams


def test_duplicate_name_in_one_kind_names_both_providers():
    registries = Registries()
    registries.for_provider("first").add("loss", "demo", make)
    with pytest.raises(PluginError, match="provided twice: by 'first' and by 'second'"):
        registries.for_provider("second").add("loss", "demo", make)


def test_same_name_in_different_kinds_is_fine():
    registries = Registries()
    registries.for_provider("a").add("loss", "x", make)
    registries.for_provider("a").add("scheduler", "x", make)
    assert registries["loss"].names() == registries["scheduler"].names() == ["x"]


def test_unknown_name_suggests_and_lists_available():
    registries = Registries()
    registries.for_provider("a").add("delta", "sparse", make)
    with pytest.raises(RecipeError, match=r"unknown delta 'sprase' \(did you mean 'sparse'\?\); available: sparse"):
        registries["delta"].get("sprase")


def test_unknown_kind_is_an_error():
    with pytest.raises(PluginError, match="unknown component kind 'optimiser'"):
        Registries()["optimiser"]
    with pytest.raises(PluginError, match="unknown component kind 'rewrad'"):
        Registries().for_provider("a").add("rewrad", "x", make)


def test_params_must_be_a_params_subclass():
    with pytest.raises(PluginError, match="must subclass"):
        Registries().for_provider("a").add("loss", "x", make, dict)


def test_frozen_registry_rejects_late_registration():
    registries = Registries()
    registries.freeze()
    with pytest.raises(PluginError, match="frozen"):
        registries.for_provider("late").add("loss", "x", make, NoParams)


def test_decorator_registration():
    registries = Registries()
    registrar = registries.for_provider("a")

    @registrar.component("scheduler", "flat")
    def flat(params, total_steps):
        """Flat schedule."""
        return lambda step: 1.0

    assert registries["scheduler"].get("flat").summary == "Flat schedule."


def test_params_are_strict_frozen_and_closed():
    with pytest.raises(Exception):
        DemoParams(size="3")
    with pytest.raises(Exception):
        DemoParams(sise=3)
    params = DemoParams(size=2)
    with pytest.raises(Exception):
        params.size = 4
