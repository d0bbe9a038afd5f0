"""Fixtures for server tests: a live ``nimbus serve`` on a loopback port, on SQLite and on
PostgreSQL (the database fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.postgres import free_port

ADMIN_KEY = "nmb_test_admin_" + uuid.uuid4().hex


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


async def wait_listening(
    process: subprocess.Popen[bytes], port: int, logs: Callable[[], str]
) -> None:
    """Until ``nimbus serve`` listens on ``port``; its ``logs`` in the error if it exits or
    does not listen within a minute."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"nimbus serve exited {process.returncode}:\n{logs()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nimbus serve did not listen:\n{logs()}") from None
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def live_server(
    database_url: str,
    fake: FakeOpenAIServer,
    tmp: Path,
    command: tuple[str, ...] = ("serve",),
    **env: str,
) -> AsyncIterator[LiveServer]:
    """Start ``nimbus serve`` (or another ``command``: ``("worker",)``, ``("serve",
    "--api-only")``) as a real process and wait until it listens."""
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
        # PostgreSQL: a killed server's runs are taken over 3 s after its last renewal
        "NIMBUS_LEASE_TTL_S": "3",
        "NIMBUS_POLL_S": "0.5",
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, waited on below
            [sys.executable, "-m", "nimbus", *command, "--port", str(port)],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", ADMIN_KEY, database_url, fake, process, log)
    try:
        await wait_listening(process, port, server.logs)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[LiveServer]:
    """A live server whose default model is a fake OpenAI endpoint asking for the calculator."""
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake,
        live_server(database_url, fake, tmp_path) as live,
    ):
        yield live
