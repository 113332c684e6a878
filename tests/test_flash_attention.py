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
