"""SRDE adapters: the SRDE state of a model (never its base weights) as one safetensors file.

Tensors are :meth:`SRDEModel.adapter_state`: ``routers.<layer>.<name>`` and
``banks.<bank key>.<projection>.<name>`` (parameters and buffers such as selected positions;
a bank shared by several layers is stored once). The safetensors metadata (all strings) holds:

- ``format``: ``"srde-adapter"``; ``format_version``: :data:`FORMAT_VERSION`;
- ``base_model``: the id of the base model the adapter was trained on;
- ``structure``: :meth:`SRDEModel.describe` as JSON; ``recipe_hash``; ``srde_version``.

Loading checks all of these first and fails with one line naming the file and the difference.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from srde_core import __version__
from srde_core.errors import SRDEError
from srde_core.model.attach import SRDEModel

FORMAT = "srde-adapter"
#: Bumped when the file layout changes; older versions are read (with a warning), newer refused.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterMetadata:
    """What an adapter file says about itself."""

    format_version: int
    base_model: str
    structure: dict[str, Any]
    recipe_hash: str
    srde_version: str


def save_adapter(
    path: str | os.PathLike[str],
    srde_model: SRDEModel,
    *,
    base_model_id: str,
    recipe_hash: str,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the SRDE state of ``srde_model`` (or ``state``, the same keys gathered by a sharding
    engine) to ``path`` atomically; returns the path.

    The file appears complete or not at all: it is written to a temporary file in the same
    directory and renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = srde_model.adapter_state() if state is None else state
    # clone() gives every tensor its own storage: safetensors refuses tensors that share memory.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base_model": base_model_id,
        "structure": json.dumps(srde_model.describe(), sort_keys=True),
        "recipe_hash": recipe_hash,
        "srde_version": __version__,
    }
    from srde_core.train.checkpoints import check_finite_tensors, writing

    check_finite_tensors(tensors, "the adapter")
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    with writing(path, cleanup=Path(tmp)):
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any other file of the run (mkstemp makes it private)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def _error(path: Path, message: str) -> SRDEError:
    return SRDEError(message, source=str(path))


def read_adapter_metadata(path: str | os.PathLike[str]) -> AdapterMetadata:
    """The metadata of the adapter at ``path`` (tensors are not read).

    Raises :class:`SRDEError` when the file is missing, not safetensors, not an SRDE adapter, or
    written by a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(path, "no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise _error(path, f"not a safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise _error(path, "not an SRDE adapter (no 'format: srde-adapter' metadata)")
    try:
        version = int(meta["format_version"])
        structure = json.loads(meta["structure"])
        if not isinstance(structure, dict):
            raise ValueError("structure is not a JSON object")
        result = AdapterMetadata(
            format_version=version,
            base_model=meta["base_model"],
            structure=structure,
            recipe_hash=meta.get("recipe_hash", ""),
            srde_version=meta.get("srde_version", ""),
        )
    except (KeyError, ValueError) as err:
        raise _error(path, f"corrupt adapter metadata ({type(err).__name__}: {err})") from err
    if version > FORMAT_VERSION:
        raise _error(
            path,
            f"adapter format version {version} is newer than this SRDE reads ({FORMAT_VERSION}); "
            "upgrade srde",
        )
    return result


def _first_difference(saved: Any, current: Any, where: str = "") -> str | None:
    """Dotted path and both values of the first place two JSON structures differ, else None."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            here = f"{where}.{key}" if where else str(key)
            if key not in saved:
                return f"{here}: not in the adapter, this model has {json.dumps(current[key])}"
            if key not in current:
                return f"{here}: the adapter has {json.dumps(saved[key])}, not in this model"
            found = _first_difference(saved[key], current[key], here)
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list):
        for i, (a, b) in enumerate(zip(saved, current)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        if len(saved) != len(current):
            return f"{where}: the adapter has {len(saved)} entries, this model {len(current)}"
        return None
    if saved != current:
        return f"{where}: the adapter has {json.dumps(saved)}, this model {json.dumps(current)}"
    return None


def _added_arguments(saved: Any, current: Any, where: str = "components") -> list[str]:
    """Dotted paths of component arguments the current model has and the adapter does not."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return []
    found = []
    for key, value in current.items():
        here = f"{where}.{key}"
        if key not in saved:
            if where.count(".") >= 2:  # inside some component's params, not a whole component
                found.append(here)
        else:
            found += _added_arguments(saved[key], value, here)
    return found


def _with_added(saved: Any, current: Any, where: str = "components") -> Any:
    """``saved`` with the component arguments only ``current`` has (see :func:`_added_arguments`)
    filled in from ``current``; whole components stay as saved."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return saved
    merged = {k: _with_added(v, current.get(k), f"{where}.{k}") for k, v in saved.items()}
    if where.count(".") >= 2:
        for key, value in current.items():
            merged.setdefault(key, value)
    return merged


def load_adapter(
    path: str | os.PathLike[str], srde_model: SRDEModel, *, base_model_id: str, recipe_hash: str | None = None
) -> AdapterMetadata:
    """Load the adapter at ``path`` into ``srde_model`` (in place) and return its metadata.

    The adapter must have been saved from the same base model id and the same SRDE structure
    (:meth:`SRDEModel.describe`), with ``recipe_hash`` (a run's: the adapter was written by that
    run) when given, and hold finite values only; otherwise an :class:`SRDEError` names the first
    difference and nothing is loaded. An older format version loads with a warning.
    """
    path = Path(path)
    meta = read_adapter_metadata(path)
    if recipe_hash and meta.recipe_hash and meta.recipe_hash != recipe_hash:
        raise _error(path, f"written by another run (recipe hash {meta.recipe_hash[:12]}, this run's "
                           f"{recipe_hash[:12]}); it is not this run's adapter")
    if meta.format_version < FORMAT_VERSION:
        warnings.warn(
            f"{path}: adapter format version {meta.format_version} is older than {FORMAT_VERSION}; "
            "loading it as is",
            stacklevel=2,
        )
    if meta.base_model != base_model_id:
        raise _error(path, f"built for base '{meta.base_model}', this model is '{base_model_id}'")

    current = json.loads(json.dumps(srde_model.describe()))
    saved_structure = dict(meta.structure)
    # Component arguments that a newer srde added (absent from the adapter) take their defaults:
    # tolerated with a warning. Everything else must match.
    added = _added_arguments(saved_structure.get("components", {}), current.get("components", {}))
    if added:
        warnings.warn(f"{path}: written before these component arguments existed, loading with their current values: "
                      f"{', '.join(added)}", stacklevel=2)
        saved_structure["components"] = _with_added(saved_structure.get("components", {}), current.get("components", {}))
    for part, label in (("layers", "layout differs"), (None, "structure differs")):
        saved = saved_structure.get(part) if part else saved_structure
        here = current.get(part) if part else current
        found = _first_difference(saved, here, part or "")
        if found:
            raise _error(path, f"{label}: {found}")

    expected = srde_model.adapter_state()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or unexpected:
            raise _error(path, f"tensors differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        tensors = {key: f.get_tensor(key) for key in expected}
    broken = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise _error(path, f"holds non-finite values ({broken[0]}{more}); srde never writes such an adapter, "
                           "so it is damaged or not this run's")
    resizable = srde_model.resizable_state_keys()
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape) and key not in resizable:
            raise _error(
                path,
                f"tensor '{key}' has shape {tuple(tensor.shape)}, this model {tuple(expected[key].shape)}",
            )
    with torch.no_grad():
        # load_state_dict copies into the live tensors (device and dtype of the model's) and
        # honours a bank's own _load_from_state_dict, e.g. one that re-derives index structures.
        srde_model.adapter.load_state_dict(tensors, strict=True)
    return meta
