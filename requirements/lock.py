"""The lock files: every dependency of an install, pinned with hashes, made by ``uv pip compile``.

``make lock`` runs this script; ``tests/test_lock.py`` calls :func:`problems` to check that the
locks still agree with ``pyproject.toml``. pyproject.toml keeps the compatible ranges a library
user of ``nimbus`` gets; the locks say which versions ``make run``, ``make test`` and the
Dockerfile install, so that the same commit installs the same versions whenever it is installed.

- ``build.txt``: pip, setuptools and wheel (``build.in``: the installer and the build backend
  that install Nimbus itself, ``pip install --no-build-isolation -e .``)
- ``base.txt``:  ``nimbus`` alone (the Dockerfile's default image)
- ``local.txt``: ``nimbus[local]`` (``make run``; the image with ``EXTRAS=local``)
- ``dev.txt``:   ``nimbus[local,dev]`` (``make test``)

``dev.txt`` is resolved first; the others are resolved within it (``--constraint``), so a
package has one version in every lock. Each lock covers every platform and Python >= 3.11
(``--universal``) and starts with the fingerprint of the pyproject.toml fields it was made from.

Stdlib only: the test imports it before anything else is known to be installed.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYPROJECT = ROOT / "pyproject.toml"
FINGERPRINT = "# pyproject.toml fingerprint: "


@dataclass(frozen=True)
class Lock:
    """One lock file: its name and what it resolves."""

    name: str
    extras: tuple[str, ...] = ()
    sources: tuple[str, ...] = ("pyproject.toml",)

    @property
    def path(self) -> Path:
        return HERE / f"{self.name}.txt"


# dev first: the others are resolved within it
LOCKS = (
    Lock("dev", ("local", "dev")),
    Lock("local", ("local",)),
    Lock("base"),
    Lock("build", sources=("requirements/build.in",)),
)


def fingerprint() -> str:
    """A hash of what the locks are made from: the project's Python range, dependencies,
    extras and build requirements (not its comments, version or tool settings)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    fields = {
        "requires-python": project["project"].get("requires-python"),
        "dependencies": project["project"].get("dependencies", []),
        "optional-dependencies": project["project"].get("optional-dependencies", {}),
        "build-system": project["build-system"].get("requires", []),
        "build.in": build_requirements(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def project_build_requires() -> list[str]:
    """pyproject.toml's ``[build-system] requires``."""
    data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    requires: list[str] = data["build-system"].get("requires", [])
    return requires


def build_requirements() -> list[str]:
    """The requirements of ``build.in``, without comments."""
    lines = (HERE / "build.in").read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


@dataclass(frozen=True)
class Pin:
    """One pinned requirement of a lock file."""

    name: str
    version: str
    marker: str | None
    hashes: tuple[str, ...]


def read_pins(path: Path) -> list[Pin]:
    """The pins of a lock file (``name==version [; marker]``, each with its hashes)."""
    pins: list[Pin] = []
    current: tuple[str, str, str | None] | None = None
    hashes: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith((" ", "\t")):
            if current is not None:
                pins.append(Pin(*current, tuple(hashes)))
            found = _PIN.match(stripped)
            if found is None:
                raise ValueError(f"{path.name}: not a pinned requirement: {stripped!r}")
            current, hashes = (normalise(found[1]), found[2], found[3]), []
        elif stripped.startswith("--hash="):
            hashes.append(stripped.removeprefix("--hash=").rstrip(" \\"))
    if current is not None:
        pins.append(Pin(*current, tuple(hashes)))
    return pins


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def compile_lock(uv: str, lock: Lock) -> None:
    """Resolve ``lock`` with ``uv pip compile`` and write it with the fingerprint."""
    command = [
        uv,
        "pip",
        "compile",
        *lock.sources,
        *(arg for extra in lock.extras for arg in ("--extra", extra)),
        "--universal",
        "--python-version",
        "3.11",
        "--generate-hashes",
        "--quiet",
        "--custom-compile-command",
        "make lock",
        "--output-file",
        str(lock.path.relative_to(ROOT)),
    ]
    if lock.name != "dev":
        command += ["--constraint", "requirements/dev.txt"]
    subprocess.run(command, cwd=ROOT, check=True)
    text = lock.path.read_text(encoding="utf-8")
    lock.path.write_text(f"{FINGERPRINT}{fingerprint()}\n{text}", encoding="utf-8")


def problems() -> list[str]:
    """What is wrong with the locks as they stand (empty: nothing). Checked offline: the
    fingerprint, a hash for every pin, one version per package across the locks, and every
    requirement of pyproject.toml pinned in the locks that install it, within its range."""
    from packaging.requirements import Requirement  # installed with the dev tools

    found: list[str] = []
    expected = fingerprint()
    versions: dict[tuple[str, str | None], tuple[str, str]] = {}
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    for lock in LOCKS:
        if not lock.path.exists():
            found.append(f"{lock.path.name} is missing: run `make lock`")
            continue
        first = lock.path.read_text(encoding="utf-8").partition("\n")[0]
        if first != FINGERPRINT + expected:
            found.append(
                f"{lock.path.name} was made from another pyproject.toml or build.in: "
                "run `make lock`"
            )
        pins = read_pins(lock.path)
        by_name: dict[str, list[Pin]] = {}
        for pin in pins:
            by_name.setdefault(pin.name, []).append(pin)
            if not pin.hashes:
                found.append(f"{lock.path.name}: {pin.name}=={pin.version} has no hash")
            seen = versions.setdefault((pin.name, pin.marker), (pin.version, lock.name))
            if seen[0] != pin.version:
                found.append(
                    f"{pin.name} is {seen[0]} in {seen[1]}.txt but {pin.version} in "
                    f"{lock.path.name}"
                )
        if lock.name == "build":
            wanted = build_requirements()
            for text in project_build_requires():
                if normalise(Requirement(text).name) not in {
                    normalise(Requirement(r).name) for r in wanted
                }:
                    found.append(f"build.in lacks {text!r} of pyproject.toml's [build-system]")
        else:
            wanted = list(project.get("dependencies", []))
            for extra in lock.extras:
                wanted += project.get("optional-dependencies", {}).get(extra, [])
        for text in wanted:
            requirement = Requirement(text)
            name = normalise(requirement.name)
            pinned = by_name.get(name)
            if not pinned:
                found.append(f"{lock.path.name} does not pin {requirement.name} ({text})")
                continue
            for pin in pinned:
                if not requirement.specifier.contains(pin.version, prereleases=True):
                    found.append(
                        f"{lock.path.name} pins {pin.name}=={pin.version}, outside {text!r}"
                    )
    return found


def main() -> int:
    uv = sys.argv[1] if len(sys.argv) > 1 else "uv"
    for lock in LOCKS:
        print(f"locking {lock.path.relative_to(ROOT)}", flush=True)
        compile_lock(uv, lock)
    left = problems()
    for problem in left:
        print(f"lock: {problem}", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
