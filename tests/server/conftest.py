"""Fixtures for server tests: PostgreSQL (the one configured, or a throwaway cluster started
from the installed binaries), and a live ``nimbus serve`` on a loopback port, on SQLite and on
PostgreSQL. PostgreSQL tests never skip: without a server and without binaries they fail."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from nimbus.testing.fake_openai import FakeOpenAIServer

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
ADMIN_KEY = "nmb_test_admin_" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _answers(url: str) -> bool:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), 3)
    except Exception:
        return False
    await conn.close()
    return True


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if not found:
        pytest.fail(
            f"no PostgreSQL answers and {name} is not installed: install postgresql "
            "(Debian: apt-get install postgresql) or set NIMBUS_TEST_POSTGRES_URL"
        )
    return found


@contextlib.contextmanager
def _throwaway_cluster() -> Iterator[str]:
    """A PostgreSQL cluster in a temp dir on a free port (as pytest-postgresql does)."""
    base = Path(tempfile.mkdtemp(prefix="nimbus-pg-"))
    data, port = base / "data", free_port()
    user_args: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the postgres account
        shutil.chown(base, "postgres")
        user_args = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *user_args,
            _pg_bin("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *user_args,
            _pg_bin("pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(base / "log"),
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*user_args, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A PostgreSQL server URL with rights to create databases."""
    url = os.environ.get("NIMBUS_TEST_POSTGRES_URL", DEFAULT_PG)
    if asyncio.run(_answers(url)):
        yield url
        return
    with _throwaway_cluster() as started:
        yield started


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = "nimbus_test_" + uuid.uuid4().hex[:12]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = postgres_admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class LiveServer:
    """A running ``nimbus serve``."""

    url: str
    admin_key: str
    database_url: str
    fake: FakeOpenAIServer
    process: subprocess.Popen[bytes]
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def live_server(
    database_url: str, fake: FakeOpenAIServer, tmp: Path, **env: str
) -> AsyncIterator[LiveServer]:
    """Start ``nimbus serve`` as a real process and wait until ``/ok`` answers."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    environment = {
        **os.environ,
        "NIMBUS_DATABASE_URL": database_url,
        "NIMBUS_ADMIN_KEY": ADMIN_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-upstream-secret",
        "NIMBUS_DEFAULT_MODEL": "openai:fake-model",
        "NIMBUS_MODEL_MAX_RETRIES": "0",
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, waited on below
            [sys.executable, "-m", "nimbus", "serve", "--port", str(port)],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", ADMIN_KEY, database_url, fake, process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nimbus serve exited {process.returncode}:\n{server.logs()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nimbus serve did not listen:\n{server.logs()}") from None
                await asyncio.sleep(0.05)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each server test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nimbus.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[LiveServer]:
    """A live server whose default model is a fake OpenAI endpoint asking for the calculator."""
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake,
        live_server(database_url, fake, tmp_path) as live,
    ):
        yield live
