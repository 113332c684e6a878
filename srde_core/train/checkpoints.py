"""Checkpoints: complete, atomic, resumable, written by every process of a run.

One directory per checkpoint, ``<phase>-step<N>``, holding what the engine session writes (the
phase's trainable module state and optimiser: ``model.safetensors`` + ``engine.pt`` for the torch
and ddp engines, shards for sharded engines), ``rng-<rank>.pt`` (each process's RNG states) and
``trainer.pt`` (step, metrics, schedule and plugin state, format version). It is written to a
temporary directory and renamed into place by the main process once every process has written its
part, so a killed run never leaves a half-written checkpoint. The last ``keep`` checkpoints of a
phase are kept; the final checkpoint of a finished phase is always kept (resuming a later phase
needs it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import save_file

from srde_core.dist import SINGLE, Dist
from srde_core.errors import SRDEError

FORMAT_VERSION = 2
_NAME = re.compile(r"^(?P<phase>.+)-step(?P<step>\d+)$")
T = TypeVar("T")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    phase: str
    step: int

    def load(self, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(trainer state, this process's RNG state or None)."""
        from srde_core.errors import SRDEError

        state = torch.load(self.path / "trainer.pt", map_location="cpu", weights_only=False)
        version = state.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise SRDEError(f"checkpoint format {version} is newer than this srde reads ({FORMAT_VERSION})", source=str(self.path))
        if version < FORMAT_VERSION:
            raise SRDEError(
                f"checkpoint format {version} is older than this srde reads ({FORMAT_VERSION}); start the run again with --fresh",
                source=str(self.path),
            )
        rng_file = self.path / f"rng-{rank}.pt"
        if not rng_file.is_file():  # not intact: resuming from it would not be exact
            raise FileNotFoundError(f"{rng_file.name} is missing")
        return state, torch.load(rng_file, map_location="cpu", weights_only=False)


_FAULTS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file size limit exceeded",
           errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EIO: "input/output error"}


def file_system_fault(err: BaseException, directory: Path) -> str | None:
    """What the file system refused, in words, when ``err`` (raised while writing into
    ``directory``) is a file-system fault: an ``OSError`` by its errno, or the wrapped forms of
    torch's and safetensors' writers (which lose the errno: a full disk is then recognised by
    its free space); None for anything else."""
    if isinstance(err, OSError) and err.errno in _FAULTS:
        return _FAULTS[err.errno]
    text = str(err)
    for code, words in _FAULTS.items():
        if os.strerror(code) in text:
            return words
    if isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError":
        if "inline_container" in text or "write" in text.lower() or isinstance(err, OSError):
            with contextlib.suppress(OSError):
                if shutil.disk_usage(directory).free < 1 << 20:
                    return "no space left on device"
            return f"the write failed ({' '.join(text.split())[:160]})"
    return None


class FileSystemFault(SRDEError, OSError):
    """The file system refused a write (one line naming it; still an ``OSError``)."""

    def __init__(self, message: str):
        SRDEError.__init__(self, message)


@contextlib.contextmanager
def writing(path: Path, *, cleanup: Path | None = None):
    """Run a write of ``path``; a file-system fault becomes one line naming it and the path
    (exit status 1), and ``cleanup`` (the write's temporary file or directory) is removed."""
    from srde_core.errors import SRDEError

    try:
        yield
    except BaseException as err:
        if cleanup is not None:
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        fault = None if isinstance(err, SRDEError) else file_system_fault(err, path.parent)
        if fault is None:
            raise
        raise FileSystemFault(f"{fault} writing {path}") from err


class NonFiniteState(ValueError):
    """A state about to be written holds NaN or infinite values."""


def check_finite_tensors(state: dict[str, Any], what: str = "the state") -> None:
    """Raise :class:`NonFiniteState` naming the first floating tensor of ``state`` that is not finite."""
    broken = [key for key, value in state.items() if torch.is_tensor(value) and value.is_floating_point()
              and not bool(torch.isfinite(value).all())]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise NonFiniteState(f"non-finite values in {what} ({broken[0]}{more})")


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state dict as safetensors; tensors sharing storage (tied embeddings) are copied.
    Weights that are not finite are never written (:class:`NonFiniteState`)."""
    check_finite_tensors(state, "the weights")
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


TEMPORARY = ".tmp-"  # prefix of a checkpoint being written


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, root: Path):
        self.root = root

    def remove_temporaries(self) -> list[Path]:
        """Remove checkpoints a killed run left half-written (main process, run directory locked)."""
        found = sorted(self.root.glob(f"{TEMPORARY}*")) if self.root.is_dir() else []
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        return found

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

    def load_intact(
        self, phase: str, load: Callable[[Checkpoint], T], *, dist: Dist = SINGLE, log: Callable[[str], None] | None = None
    ) -> tuple[Checkpoint | None, T | None]:
        """``(checkpoint, load(checkpoint))`` for the newest checkpoint of ``phase`` that ``load``
        reads without error on every process; ``(None, None)`` when the phase has none.

        A checkpoint whose files are damaged (a truncated ``trainer.pt``, ``engine.pt`` or
        ``model.safetensors``) is passed over for the next older one, and ``log`` says so in one
        line; when none can be read, one :class:`SRDEError` line. ``SRDEError``s of ``load`` (a
        checkpoint format this version does not read) are not damage and pass through. Called on
        every process (they agree on the checkpoint through one collective per candidate).
        """
        from srde_core.errors import SRDEError, one_line

        damaged: list[tuple[Checkpoint, str]] = []
        for checkpoint in reversed(self.list(phase)):
            try:
                result, problem = load(checkpoint), None
            except SRDEError:
                raise
            except Exception as err:  # noqa: BLE001 - torch, zip and safetensors errors of a damaged file
                result, problem = None, one_line(err, limit=160)
            failed = float(dist.all_sum(torch.tensor([0.0 if problem is None else 1.0])).sum())
            if failed == 0:
                if damaged and log is not None:
                    names = ", ".join(c.path.name for c, _ in damaged)
                    which = f"checkpoint {names} is" if len(damaged) == 1 else f"checkpoints {names} are"
                    log(f"{phase}: {which} damaged ({damaged[0][1]}); resuming from {checkpoint.path.name}")
                return checkpoint, result
            damaged.append((checkpoint, problem or "damaged on another process"))
        if damaged:
            newest, problem = damaged[0]
            raise SRDEError(
                f"no intact checkpoint of phase '{phase}' ({newest.path.name}: {problem}"
                + (f"; {len(damaged) - 1} older damaged too" if len(damaged) > 1 else "")
                + "); remove them to run the phase again from its start, or start over with --fresh",
                source=str(self.root.parent),
            )
        return None, None

    def save(
        self,
        phase: str,
        step: int,
        write: Callable[[Path], None],
        trainer_state: dict[str, Any],
        *,
        keep: int,
        final_step: int,
        dist: Dist = SINGLE,
    ) -> Path:
        """Write one checkpoint; called on every process. ``write(directory)`` stores the engine's
        part (each process its own), then every process its RNG state and the main process
        ``trainer_state``; the main process renames the directory into place."""
        from srde_core.errors import SRDEError

        target = self.root / f"{phase}-step{step:07d}"
        tmp = self.root / f"{TEMPORARY}{target.name}"
        if dist.is_main:
            with writing(target):
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        dist.barrier()
        try:
            with writing(target, cleanup=tmp if dist.is_main else None):
                write(tmp)
                torch.save(rng_state(), tmp / f"rng-{dist.rank}.pt")
                if dist.is_main:
                    torch.save({**trainer_state, "format_version": FORMAT_VERSION, "phase": phase, "step": step},
                               tmp / "trainer.pt")
        except NonFiniteState as err:
            raise SRDEError(f"phase '{phase}', step {step}: {err}; stopped, the checkpoint was not written",
                            source=str(self.root.parent)) from None
        dist.barrier()
        if dist.is_main:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            self._prune(phase, keep, final_step)
        dist.barrier()
        return target

    def _prune(self, phase: str, keep: int, final_step: int) -> None:
        found = self.list(phase)
        for old in found[:-keep]:
            if old.step != final_step:
                shutil.rmtree(old.path, ignore_errors=True)
