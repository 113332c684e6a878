"""Reading recipe files: TOML parsing, ``extends`` chains, deep merge, ``--set`` overrides.

The merge keeps the *provenance* of every key (which file, or which ``--set``, gave it) so that a
validation error can name the file the user has to edit.

A recipe is a path or the name of a preset shipped with the package, ``srde:NAME`` (the files of
``srde_core/recipes/``; ``recipes/`` in a checkout is the same folder). ``extends`` takes either.
A relative path in a recipe (data files, the tokenizer file, a local model, a DeepSpeed config)
resolves against the directory of the file that gave it; a path given with ``--set``, or by a
shipped preset, resolves against the working directory (see :meth:`Layers.base_for`).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from srde_core.errors import RecipeError

KeyPath = tuple[str | int, ...]
PRESET_PREFIX = "srde:"


def preset_names() -> list[str]:
    """The presets shipped with the package (``srde:NAME``)."""
    return sorted(p.stem for p in _presets_dir().glob("*.toml"))


def _presets_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("srde_core") / "recipes"))


def locate(reference: str | Path, *, relative_to: Path | None = None) -> Path:
    """The file of a recipe reference: ``srde:NAME`` (a shipped preset) or a path."""
    text = str(reference)
    if text.startswith(PRESET_PREFIX):
        name = text[len(PRESET_PREFIX):]
        path = _presets_dir() / f"{name}.toml"
        if not name or not path.is_file():
            from srde_core.errors import available, did_you_mean

            names = preset_names()
            raise RecipeError(f"no preset '{text}'{did_you_mean(name, names)}; {available(PRESET_PREFIX + n for n in names)}")
        return path
    path = Path(text)
    return relative_to / path if relative_to is not None and not path.is_absolute() else path


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is one of the shipped presets (``recipes/NAME.toml`` in a checkout too)."""
    try:
        return path.resolve().parent == _presets_dir().resolve()
    except OSError:
        return False


def format_key(path: KeyPath) -> str:
    """``("phases", 0, "lr")`` -> ``"phases[0].lr"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file; errors name the file and the line."""
    shown = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("file not found", source=shown) from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"not UTF-8 text (byte {err.start}: {err.reason})", source=shown) from None
    except OSError as err:
        raise RecipeError(f"cannot read file ({err.strerror})", source=shown) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(err))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))
        where = f"line {match.group(1)}" if match else None
        raise RecipeError(f"invalid TOML: {message}", source=shown, key=where) from None


class Layers:
    """The merged recipe data, where each key came from, and the base of relative paths."""

    def __init__(self, top: Path, base_dir: Path | None = None):
        self.top = top
        # absolute() keeps symlinks (recipes/ -> srde_core/recipes/ in a checkout) as the user sees them
        self.base_dir = base_dir if base_dir is not None else top.absolute().parent
        self.data: dict[str, Any] = {}
        self.provenance: dict[KeyPath, str] = {}
        self.files: list[Path] = []
        self.source_dirs: dict[str, Path] = {}  # source label -> where its relative paths start

    def base_for(self, path: KeyPath) -> Path:
        """The directory a relative path at ``path`` resolves against: the directory of the recipe
        file that gave the value; the working directory for a ``--set`` value or a value from a
        shipped preset (whose paths name the user's files, not the package's); else ``base_dir``."""
        for cut in range(len(path), 0, -1):
            source = self.provenance.get(tuple(path[:cut]))
            if source is None:
                continue
            if source.startswith("--set "):
                return Path.cwd()
            return self.source_dirs.get(source, self.base_dir)
        return self.base_dir

    def source_of(self, path: KeyPath) -> str:
        for cut in range(len(path), 0, -1):
            source = self.provenance.get(tuple(path[:cut]))
            if source is not None:
                return source
        return _display(self.top)

    def merge(self, data: dict[str, Any], source: str) -> None:
        self._merge_into(self.data, data, (), source)

    def _merge_into(self, target: dict, data: dict, prefix: KeyPath, source: str) -> None:
        for key, value in data.items():
            path = (*prefix, key)
            base = target.get(key)
            # A component table that names another component replaces the old one: the old
            # component's arguments mean nothing to the new one.
            other_component = isinstance(base, dict) and isinstance(value, dict) and "name" in value and base.get("name") != value["name"]
            if isinstance(value, dict) and isinstance(base, dict) and not other_component:
                self._merge_into(target[key], value, path, source)
            else:
                # Tables merge key by key; arrays and scalars replace what a base file had.
                for old in [p for p in self.provenance if p[: len(path)] == path]:
                    del self.provenance[old]
                target[key] = copy.deepcopy(value)
                self.provenance[path] = source

    def apply_override(self, assignment: str) -> None:
        """Apply one ``--set key.path=value`` (value parsed as TOML, else taken as a string)."""
        source = f"--set {assignment}"
        if "=" not in assignment:
            raise RecipeError("expected KEY=VALUE", source=source)
        raw_key, raw_value = assignment.split("=", 1)
        parts = [p for p in raw_key.strip().split(".")]
        if not raw_key.strip() or any(not p for p in parts):
            raise RecipeError("empty key", source=source)
        value = parse_value(raw_value.strip())
        node: Any = self.data
        path: list[str | int] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, source, format_key(tuple(path)))
                path.append(index)
                if last:
                    node[index] = value
                else:
                    node = node[index]
                continue
            if not isinstance(node, dict):
                raise RecipeError("cannot set a key inside a non-table value", source=source, key=format_key(tuple(path)))
            path.append(part)
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        self.provenance[tuple(path)] = source


def _list_index(items: list, part: str, source: str, key: str) -> int:
    """A list element by position (``phases.0``) or by its ``name`` (``phases.joint``)."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(items) <= index < len(items):
            return index % len(items)
        raise RecipeError(f"index {index} out of range (length {len(items)})", source=source, key=key)
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    names = [str(item.get("name")) for item in items if isinstance(item, dict) and "name" in item]
    raise RecipeError(f"no element named '{part}' (names: {', '.join(names) or 'none'})", source=source, key=key)


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``, ``{a = 1}``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_layers(reference: str | Path, overrides: list[str] = ()) -> Layers:
    """Read a recipe and its ``extends`` chain (base first), then apply ``--set`` overrides.

    Tables merge key by key, except a component table whose ``name`` differs from the one it
    extends: it replaces it (``delta = { name = "lora", rank = 4 }`` over a sparse delta drops the
    sparse arguments)."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    is_preset = str(reference).startswith(PRESET_PREFIX)
    path = locate(reference)
    current = path
    while True:
        resolved = current.resolve()
        if resolved in seen:
            cycle = " -> ".join(_display(p) for p in [*seen, resolved])
            raise RecipeError(f"extends cycle: {cycle}", source=_display(path), key="extends")
        seen.append(resolved)
        data = read_toml(current)
        chain.append((current, data))
        parent = data.pop("extends", None)
        if parent is None:
            break
        if not isinstance(parent, str):
            raise RecipeError(
                "extends must be a string (a path relative to this file, or srde:NAME)", source=_display(current), key="extends"
            )
        try:
            target = locate(parent, relative_to=current.parent)
        except RecipeError as err:
            raise RecipeError(err.message, source=_display(current), key="extends") from None
        if not target.is_file():
            raise RecipeError(f"extended file '{parent}' not found", source=_display(current), key="extends")
        current = target
    layers = Layers(path, Path.cwd() if is_preset or is_shipped(path) else None)
    for file, data in reversed(chain):
        layers.merge(data, _display(file))
        layers.source_dirs[_display(file)] = Path.cwd() if is_shipped(file) else file.absolute().parent
        layers.files.append(file)
    for assignment in overrides:
        layers.apply_override(assignment)
    return layers
