"""No built-in plugin imports another plugin's package: plugins meet only through the core's registries,
hooks and contracts (CONTRIBUTING, "Adding a plugin"). A family's package (``deltas/sparse``, ``data``,
...) may share its modules between its own entry points."""

from __future__ import annotations

import ast
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[1] / "plugins" / "srde_plugins"


def family(module: str) -> str:
    """``srde_plugins.deltas.sparse.dynamic.bank`` -> ``deltas.sparse``; ``srde_plugins.rl.trainer`` -> ``rl``."""
    parts = module.split(".")[1:]
    return ".".join(parts[:2]) if parts and parts[0] == "deltas" else (parts[0] if parts else "")


def imported_modules(path: Path) -> list[str]:
    package = ".".join(("srde_plugins", *path.relative_to(PLUGINS).with_suffix("").parts[:-1]))
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
    return [n for n in names if n.startswith("srde_plugins.")]


def test_family_names_the_package_a_module_belongs_to():
    assert family("srde_plugins.deltas.sparse.dynamic.bank") == "deltas.sparse"
    assert family("srde_plugins.deltas.lora") == "deltas.lora"
    assert family("srde_plugins.rl.trainer") == "rl"


def test_no_plugin_imports_another_plugins_package():
    crossings = []
    for path in sorted(PLUGINS.rglob("*.py")):
        own = family(".".join(("srde_plugins", *path.relative_to(PLUGINS).with_suffix("").parts)))
        if not own or own == "__init__":
            continue
        crossings += [f"{path.relative_to(PLUGINS)} imports {name}" for name in imported_modules(path) if family(name) != own]
    assert not crossings, "\n".join(crossings)
