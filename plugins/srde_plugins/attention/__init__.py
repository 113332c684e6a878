"""Flash attention: picks a flash kernel where the package and a CUDA GPU are there, else says why not.

    [plugins.flash_attention]
    enabled = true
    implementation = "auto"      # or "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn"

``auto`` takes flash-attn 3 (package ``flash_attn_interface``, Hopper), else flash-attn 2 (package
``flash_attn``), else the HF ``kernels`` hub variant when ``kernels`` is installed. Without a CUDA
GPU or any of them the run keeps the recipe's ``model.attn_implementation`` (sdpa) and its header says
what it fell back to and why.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import Params

#: implementation -> the Python package it needs
KERNELS = {
    "flash_attention_3": "flash_attn_interface",
    "flash_attention_2": "flash_attn",
    "kernels-community/flash-attn": "kernels",
}


class FlashAttentionParams(Params):
    enabled: bool = Field(False, description="use a flash attention kernel where one can run")
    implementation: Literal["auto", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn"] = Field(
        "auto", description="the kernel; auto: the best one installed"
    )


def choose(settings: FlashAttentionParams, *, cuda: bool, installed: set[str], fallback: str) -> tuple[str, str]:
    """(attn_implementation, why) for these settings on a machine with/without CUDA and packages."""
    if not settings.enabled:
        return fallback, "flash attention is off"
    if not cuda:
        return fallback, "no CUDA GPU: flash attention needs one"
    wanted = list(KERNELS) if settings.implementation == "auto" else [settings.implementation]
    for implementation in wanted:
        if KERNELS[implementation] in installed:
            return implementation, f"package {KERNELS[implementation]} installed"
    missing = " or ".join(KERNELS[w] for w in wanted)
    return fallback, f"{missing} is not installed (pip install 'srde[gpu]')"


def _decision(recipe) -> tuple[str, str]:
    settings = recipe.settings("flash_attention")
    cuda = False
    if settings.enabled and recipe.device != "cpu":
        import torch

        cuda = torch.cuda.is_available()
    installed = {package for package in KERNELS.values() if importlib.util.find_spec(package) is not None}
    return choose(settings, cuda=cuda, installed=installed, fallback=recipe.model.attn_implementation)


@hookimpl
def srde_register(registry):
    registry.settings("flash_attention", FlashAttentionParams, "Flash attention kernels on CUDA GPUs, with a stated fallback.")


@hookimpl
def srde_model_load_kwargs(recipe):
    implementation, _ = _decision(recipe)
    return {"attn_implementation": implementation} if implementation in KERNELS else None


@hookimpl
def srde_run_header(recipe):
    if not recipe.settings("flash_attention").enabled:
        return None
    implementation, why = _decision(recipe)
    if implementation in KERNELS:
        return [f"flash attention: {implementation} ({why})"]
    return [f"flash attention: falling back to {implementation} ({why})"]
