"""Flash attention: picks a flash kernel where the package and a CUDA GPU are there, else says why not.

    [plugins.flash_attention]
    enabled = true
    implementation = "auto"      # or "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn"

``auto`` takes flash-attn 3 (package ``flash_attn_interface``, Hopper), else flash-attn 2 (package
``flash_attn``), else the HF ``kernels`` hub variant when ``kernels`` is installed. A kernel counts only
where its package imports (a build against another torch or CUDA fails there) and the GPU is new enough
for it (flash-attn 2: compute capability 8.0, Ampere; flash-attn 3: 9.0, Hopper). Without a CUDA GPU or
any usable kernel the run keeps the recipe's ``model.attn_implementation`` (sdpa) and its header says
what it fell back to and why.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
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


#: implementation -> the lowest CUDA compute capability its kernels run on
MIN_CAPABILITY = {
    "flash_attention_3": (9, 0),
    "flash_attention_2": (8, 0),
    "kernels-community/flash-attn": (8, 0),
}


class FlashAttentionParams(Params):
    enabled: bool = Field(False, description="use a flash attention kernel where one can run")
    implementation: Literal["auto", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn"] = Field(
        "auto", description="the kernel; auto: the best one installed"
    )


def choose(settings: FlashAttentionParams, *, cuda: bool, installed: set[str], fallback: str,
           broken: Mapping[str, str] | None = None, capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """(attn_implementation, why) for these settings on a machine with/without CUDA, the packages
    ``installed``, those of them that fail to import (``broken``: package -> why) and the GPU's
    compute ``capability``."""
    if not settings.enabled:
        return fallback, "flash attention is off"
    if not cuda:
        return fallback, "no CUDA GPU: flash attention needs one"
    broken = broken or {}
    wanted = list(KERNELS) if settings.implementation == "auto" else [settings.implementation]
    reasons = []
    for implementation in wanted:
        package = KERNELS[implementation]
        if package not in installed:
            continue
        if package in broken:
            reasons.append(f"{package} {broken[package]}")
            continue
        needed = MIN_CAPABILITY[implementation]
        if capability is not None and tuple(capability) < needed:
            reasons.append(f"{implementation} needs a GPU of compute capability {needed[0]}.{needed[1]}, this one is "
                           f"{capability[0]}.{capability[1]}")
            continue
        return implementation, f"package {package} installed"
    if reasons:
        return fallback, "; ".join(reasons)
    missing = " or ".join(KERNELS[w] for w in wanted)
    return fallback, f"{missing} is not installed (pip install -e '.[gpu]' --no-build-isolation)"


def import_failure(package: str) -> str | None:
    """None where ``package`` imports; else why not, in one line."""
    try:
        importlib.import_module(package)
    except Exception as err:  # noqa: BLE001 - a broken build raises ImportError, OSError, RuntimeError ...
        text = str(err).strip().splitlines()
        return f"fails to import ({type(err).__name__}: {text[0] if text else ''})"
    return None


def _decision(recipe) -> tuple[str, str]:
    settings = recipe.settings("flash_attention")
    cuda, capability = False, None
    if settings.enabled and recipe.device != "cpu":
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            capability = torch.cuda.get_device_capability()
    installed = {package for package in KERNELS.values() if importlib.util.find_spec(package) is not None}
    broken = {}
    if cuda:
        broken = {package: why for package in installed if (why := import_failure(package)) is not None}
    return choose(settings, cuda=cuda, installed=installed, fallback=recipe.model.attn_implementation,
                  broken=broken, capability=capability)


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
