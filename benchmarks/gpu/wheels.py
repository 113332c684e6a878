"""Wheels for a GPU image without network: what it lacks to run SRDE, carried with the tree.

``python benchmarks/gpu/wheels.py build`` (on a machine with the package index and SRDE's
environment installed, e.g. ``pip install -e ".[dev]"``) walks the requirements of
``pyproject.toml`` (the core dependencies and ``deepspeed``; not flash-attn, whose builds run to
hundreds of MB and are tied to one torch) through the installed packages' metadata, for the target
Python, and puts into ``benchmarks/gpu/wheels/`` (ignored by git) the wheels of exactly the versions
installed here of:

- every package of that closure the GPU image does not list (``image_packages.txt``: deepspeed,
  mistral-common, datasets, pydantic and what they need that the image lacks);
- every pure-Python package of it (a few MB: they replace an image version that is too old, and are
  installed only then);
- ``setuptools`` and ``wheel`` (the isolated build of SRDE's own editable install).

torch is never carried: the image's build of torch (CUDA) is the one to use, with its own
dependencies. deepspeed is published as a source archive only: it is built here into a pure-Python
wheel (its CUDA ops compile just in time, and the deepspeed engine uses none). ``manifest.json``
lists what was carried and what to install.

``python benchmarks/gpu/wheels.py install`` (on the GPU machine; ``run.sh`` does it) installs SRDE
(editable) and deepspeed with pip from those wheels alone (``--no-index``): pip keeps every image
package that satisfies the requirements and installs from the folder only what is missing or too
old. A wheel put into the folder by hand (a flash-attn build for the image's torch) is installed
too, without its dependencies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WHEELS = HERE / "wheels"
MANIFEST = "manifest.json"
#: provided by the image with its CUDA build; never carried, their requirements not walked
IMAGE_STACK = {"torch", "triton"}
#: the extras of pyproject.toml whose packages the kit needs besides the core dependencies
EXTRA_ROOTS = {"deepspeed"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]


def image_packages(path: Path = HERE / "image_packages.txt") -> set[str]:
    """The canonical names of the Python packages the GPU image has (one a line, # comments)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {canonicalize_name(line) for line in lines if line}


def project_roots(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The core dependencies of ``pyproject.toml`` and its ``EXTRA_ROOTS`` packages (from any extra)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    for requirements in project.get("optional-dependencies", {}).values():
        for text in requirements:
            req = Requirement(text)
            if canonicalize_name(req.name) in EXTRA_ROOTS and all(r.name != req.name for r in roots):
                roots.append(req)
    return roots


def build_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """``[build-system] requires`` of ``pyproject.toml`` (setuptools and wheel)."""
    return [Requirement(r) for r in tomllib.loads(pyproject.read_text(encoding="utf-8"))["build-system"]["requires"]]


def marker_env(python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def is_pure(dist: metadata.Distribution) -> bool:
    """Whether the installed distribution came from a wheel for any platform (pure Python)."""
    wheel = dist.read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel and all(line.split(": ", 1)[1].endswith("-none-any")
                                                    for line in wheel.splitlines() if line.startswith("Tag: "))


def closure(roots: list[Requirement], python: str) -> dict[str, metadata.Distribution]:
    """Canonical name -> installed distribution of every package the roots need on ``python``
    (markers evaluated for it, with the extras each requirement asks for), not descending into
    ``IMAGE_STACK``. A needed package that is not installed here stops with one line."""
    env = marker_env(python)
    found: dict[str, metadata.Distribution] = {}
    walked: set[tuple[str, str]] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (req.marker and not req.marker.evaluate(env)) or name in IMAGE_STACK:
            continue
        if name not in found:
            try:
                found[name] = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                sys.exit(f"wheels: {name} (needed by the project) is not installed here; pip install -e '.[dev]' first")
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in walked:
                continue
            walked.add((name, extra))
            for text in found[name].requires or []:
                need = Requirement(text)
                if need.marker is None or need.marker.evaluate({**env, "extra": extra}):
                    todo.append(Requirement(str(need).split(";")[0]))  # its marker is decided here
    return found


def choose(found: dict[str, metadata.Distribution], image: set[str]) -> dict[str, str]:
    """name -> version of the packages to carry: those the image lacks, and the pure-Python ones."""
    return {name: dist.version for name, dist in sorted(found.items()) if name not in image or is_pure(dist)}


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch(name: str, version: str, dest: Path, pythons: list[str]) -> tuple[list[str], list[str]]:
    """Download the wheel of ``name==version`` (or of the newest within a specifier such as
    ``>=69``) for each target Python, or build it here from the source archive where no wheel is
    published (it must come out pure Python). Returns the new files and the Pythons left without
    one (a warning; stops where no Python has one)."""
    before = set(p.name for p in dest.glob("*.whl"))
    spec = f"{name}{version}" if version[:1] in "<>=!~" else f"{name}=={version}"
    missing, why = [], ""
    for python in pythons:
        platform = [a for p in PLATFORMS for a in ("--platform", p)]
        done = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation",
                    "cp", *platform, "-d", str(dest), spec)
        if done.returncode == 0:
            continue
        why = (done.stderr.strip().splitlines() or ["?"])[-1]
        with tempfile.TemporaryDirectory() as tmp:
            built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", tmp, spec)
            wheels = list(Path(tmp).glob("*.whl"))
            if built.returncode == 0 and len(wheels) == 1 and wheels[0].name.endswith("-none-any.whl"):
                wheels[0].replace(dest / wheels[0].name)
                return sorted(set(p.name for p in dest.glob("*.whl")) - before), []  # serves every Python
        missing.append(python)
    if len(missing) == len(pythons):
        sys.exit(f"wheels: no wheel of {spec} ({why}), and no pure-Python build")
    for python in missing:
        print(f"  warning: no wheel of {spec} for Python {python}")
    return sorted(set(p.name for p in dest.glob("*.whl")) - before), missing


def build(dest: Path, pythons: list[str]) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    image, roots = image_packages(), project_roots()
    carried: dict[str, str] = {}
    for python in pythons:
        carried.update(choose(closure(roots, python), image))
    for req in build_requirements():  # the newest that fits, where not installed here
        name = canonicalize_name(req.name)
        try:
            carried.setdefault(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            carried.setdefault(name, str(req.specifier))
    files: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    for name, version in carried.items():
        files[name], missing[name] = fetch(name, version, dest, pythons)
        print(f"  {name} {version}: {', '.join(files[name]) or 'already there'}")
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    manifest = {
        "pythons": pythons,
        "install": [str(r) for r in roots if canonicalize_name(r.name) in EXTRA_ROOTS],
        "carried": {name: {"version": version, "files": files[name], "in_image": name in image,
                           **({"no_wheel_for": missing[name]} if missing[name] else {})}
                    for name, version in carried.items()},
        "bytes": size,
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"wheels: {len(carried)} packages, {size / 2**20:.1f} MiB in {dest}")
    return manifest


def install_command(dest: Path, manifest: dict, dry_run: bool = False) -> list[list[str]]:
    """The pip commands that install SRDE (editable) and the kit's extra packages from ``dest``
    alone, and then any wheel put there by hand (without its dependencies)."""
    flags = ["--no-index", "--find-links", str(dest), "--no-cache-dir", "--disable-pip-version-check",
             *(["--dry-run"] if dry_run else [])]
    if Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists():
        flags.append("--break-system-packages")
    commands = [[sys.executable, "-m", "pip", "install", *flags, "-e", str(ROOT), *manifest["install"]]]
    listed = {f for entry in manifest["carried"].values() for f in entry["files"]}
    extra = sorted(str(p) for p in dest.glob("*.whl") if p.name not in listed)
    if extra:
        commands.append([sys.executable, "-m", "pip", "install", *flags, "--no-deps", *extra])
    return commands


def install(dest: Path, dry_run: bool = False) -> int:
    path = dest / MANIFEST
    if not path.is_file():
        print(f"wheels: {path} is missing: run `python benchmarks/gpu/wheels.py build` where pip reaches the index",
              file=sys.stderr)
        return 2
    for command in install_command(dest, json.loads(path.read_text(encoding="utf-8")), dry_run):
        print("+ " + " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print("wheels: pip failed (above); a package of the image may be too old for a carried one: rebuild the "
                  "wheels with the image's Python (--python-version)", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "install"])
    parser.add_argument("--dest", type=Path, default=WHEELS, help="the wheel folder (default: benchmarks/gpu/wheels)")
    parser.add_argument("--python-version", action="append", dest="pythons",
                        help="the GPU image's Python, X.Y (repeat for several; default 3.11, 3.12 and 3.13)")
    parser.add_argument("--dry-run", action="store_true", help="install: say what pip would install, install nothing")
    args = parser.parse_args(argv)
    if args.action == "build":
        build(args.dest, args.pythons or ["3.11", "3.12", "3.13"])
        return 0
    return install(args.dest, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
