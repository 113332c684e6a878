"""Checkpoints: complete, atomic, resumable.

One directory per checkpoint, ``<phase>-step<N>``, holding ``model.safetensors`` (the phase's
trainable module state) and ``trainer.pt`` (engine = optimiser + LR schedule, RNG states, step,
plugin state, format version). It is written to a temporary directory and renamed into place, so a
killed run never leaves a half-written checkpoint. The last ``keep`` checkpoints of a phase are
kept; the final checkpoint of a finished phase is always kept (resuming a later phase needs it).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_NAME = re.compile(r"^(?P<phase>.+)-step(?P<step>\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    phase: str
    step: int

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(module state, trainer state)."""
        state = torch.load(self.path / "trainer.pt", map_location="cpu", weights_only=False)
        version = state.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise ValueError(f"{self.path}: checkpoint format {version} is newer than this srde ({FORMAT_VERSION})")
        if version < FORMAT_VERSION:
            warnings.warn(f"{self.path}: old checkpoint format {version}; loading what it has", stacklevel=2)
        return load_file(self.path / "model.safetensors"), state


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state dict as safetensors; tensors sharing storage (tied embeddings) are copied."""
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if pointer in seen else value.contiguous()
        seen.add(pointer)
    save_file(tensors, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, root: Path):
        self.root = root

    def list(self, phase: str) -> list[Checkpoint]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _NAME.match(entry.name)
            if match and match["phase"] == phase and (entry / "trainer.pt").is_file():
                found.append(Checkpoint(entry, phase, int(match["step"])))
        return sorted(found, key=lambda c: c.step)

    def latest(self, phase: str) -> Checkpoint | None:
        found = self.list(phase)
        return found[-1] if found else None

    def save(self, phase: str, step: int, module_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], *, keep: int, final_step: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / f"{phase}-step{step:07d}"
        tmp = self.root / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_tensors(module_state, tmp / "model.safetensors")
        torch.save({**trainer_state, "format_version": FORMAT_VERSION, "phase": phase, "step": step}, tmp / "trainer.pt")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        self._prune(phase, keep, final_step)
        return target

    def _prune(self, phase: str, keep: int, final_step: int) -> None:
        found = self.list(phase)
        for old in found[:-keep]:
            if old.step != final_step:
                shutil.rmtree(old.path, ignore_errors=True)
