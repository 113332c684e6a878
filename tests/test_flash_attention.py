"""The flash attention plugin (`srde_plugins.attention`): the decision, its fallback and the header."""

from __future__ import annotations

import pytest

from srde_core.recipe import load_recipe
from srde_plugins.attention import FlashAttentionParams, choose

ALL = {"flash_attn", "flash_attn_interface", "kernels"}


@pytest.mark.parametrize(
    ("settings", "cuda", "installed", "expected"),
    [
        ({"enabled": False}, True, ALL, "sdpa"),
        ({"enabled": True}, False, ALL, "sdpa"),
        ({"enabled": True}, True, ALL, "flash_attention_3"),
        ({"enabled": True}, True, {"flash_attn"}, "flash_attention_2"),
        ({"enabled": True}, True, {"kernels"}, "kernels-community/flash-attn"),
        ({"enabled": True}, True, set(), "sdpa"),
        ({"enabled": True, "implementation": "flash_attention_2"}, True, {"flash_attn_interface"}, "sdpa"),
        ({"enabled": True, "implementation": "flash_attention_2"}, True, {"flash_attn"}, "flash_attention_2"),
    ],
)
def test_the_kernel_is_chosen_from_gpu_and_packages(settings, cuda, installed, expected):
    implementation, why = choose(FlashAttentionParams(**settings), cuda=cuda, installed=installed, fallback="sdpa")
    assert implementation == expected and why


def test_the_reason_names_what_is_missing():
    assert "no CUDA GPU" in choose(FlashAttentionParams(enabled=True), cuda=False, installed=ALL, fallback="sdpa")[1]
    why = choose(FlashAttentionParams(enabled=True, implementation="flash_attention_2"), cuda=True, installed=set(), fallback="sdpa")[1]
    assert "flash_attn is not installed" in why


def test_on_this_cpu_machine_the_run_falls_back_and_says_so(plugins, micro_recipe):
    recipe = load_recipe(micro_recipe, plugins, ["plugins.flash_attention.enabled=true"])
    lines = [line for group in plugins.hook.srde_run_header(recipe=recipe) for line in (group or [])]
    assert any(line.startswith("flash attention: falling back to sdpa (no CUDA GPU") for line in lines)
    kwargs = [k for k in plugins.hook.srde_model_load_kwargs(recipe=recipe) if k]
    assert kwargs == []  # the recipe's sdpa stays


def test_a_package_that_fails_to_import_falls_back_with_its_reason():
    settings = FlashAttentionParams(enabled=True)
    implementation, why = choose(settings, cuda=True, installed={"flash_attn"}, fallback="sdpa", capability=(9, 0),
                                 broken={"flash_attn": "fails to import (ImportError: undefined symbol: _ZN3c10)"})
    assert implementation == "sdpa" and "undefined symbol" in why


def test_a_gpu_older_than_the_kernel_falls_back_with_its_reason():
    settings = FlashAttentionParams(enabled=True)
    implementation, why = choose(settings, cuda=True, installed={"flash_attn"}, fallback="sdpa", capability=(7, 5))
    assert implementation == "sdpa" and "8.0" in why and "7.5" in why
    # flash-attn 3 wants Hopper; on an Ampere GPU auto takes flash-attn 2
    ampere = choose(settings, cuda=True, installed={"flash_attn_interface", "flash_attn"}, fallback="sdpa", capability=(8, 0))
    assert ampere[0] == "flash_attention_2"


def test_import_failure_names_the_error(tmp_path, monkeypatch):
    from srde_plugins.attention import import_failure

    (tmp_path / "broken_flash_pkg.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    why = import_failure("broken_flash_pkg")
    assert why is not None and "OSError" in why and "libcudart" in why
    assert import_failure("json") is None
