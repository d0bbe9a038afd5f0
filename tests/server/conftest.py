"""Fixtures for server tests: a Nimbus server on a loopback port, on SQLite and on PostgreSQL
(the database fixtures are in ``tests/conftest.py``).

The ``server`` fixture runs the app in the test's own process (:func:`in_process_server`:
the same app, settings and HTTP protocol as ``nimbus serve``, served by uvicorn on the test's
event loop), which starts in a fraction of a process's time. A test marked
``@pytest.mark.live`` gets a real ``nimbus serve`` process instead (:func:`live_server`):
those that kill, restart or read the logs of a server, or measure what a process holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from nimbus.adapters.api.app import create_app
from nimbus.adapters.api.connections import BoundedHttpProtocol, connection_cap
from nimbus.settings import Settings
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


def _server_environment(database_url: str, fake: FakeOpenAIServer) -> dict[str, str]:
    """The settings of a test server: its database, the fake model endpoint, short leases."""
    return {
        "NIMBUS_DATABASE_URL": database_url,
        "NIMBUS_ADMIN_KEY": ADMIN_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-upstream-secret",
        "NIMBUS_DEFAULT_MODEL": "openai:fake-model",
        "NIMBUS_MODEL_MAX_RETRIES": "0",
        # PostgreSQL: a killed server's runs are taken over 3 s after its last renewal
        "NIMBUS_LEASE_TTL_S": "3",
        "NIMBUS_POLL_S": "0.5",
        # a server stopped at a test's end waits this long for the runs it leaves behind
        "NIMBUS_SHUTDOWN_GRACE_S": "2",
    }


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
    environment = {**os.environ, **_server_environment(database_url, fake), **env}
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


@dataclass
class InProcessServer:
    """The app of ``nimbus serve``, served in this process (no ``process``, no ``logs``)."""

    url: str
    admin_key: str
    database_url: str
    fake: FakeOpenAIServer


def _settings(environment: dict[str, str]) -> Settings:
    """The settings a server started with ``environment`` would read (pydantic-settings reads
    them from the process's environment: set for the moment it takes, then put back)."""
    with _ENVIRONMENT:
        kept = {k: os.environ.get(k) for k in environment}
        os.environ.update(environment)
        try:
            return Settings()
        finally:
            for k, v in kept.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_ENVIRONMENT = threading.Lock()


@contextlib.asynccontextmanager
async def in_process_server(
    database_url: str, fake: FakeOpenAIServer, **env: str
) -> AsyncIterator[InProcessServer]:
    """The app with the settings :func:`live_server` gives its process (and ``env``), served
    here by uvicorn with ``nimbus serve``'s HTTP protocol, until the block ends."""
    settings = _settings({**_server_environment(database_url, fake), **env})
    port = free_port()
    protocol = BoundedHttpProtocol.limited(
        connection_cap(settings, 4096), settings.header_timeout_s
    )
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        http=protocol,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )
    served = _Quiet(config)
    task = asyncio.create_task(served.serve())
    try:
        while not served.started:
            if task.done():
                task.result()  # what stopped it from starting
                raise RuntimeError("the in-process server stopped before it started")
            await asyncio.sleep(0.01)
        yield InProcessServer(f"http://127.0.0.1:{port}", ADMIN_KEY, database_url, fake)
    finally:
        served.should_exit = True
        await task


class _Quiet(uvicorn.Server):
    """uvicorn's server without its signal handlers (they are the test runner's)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest.fixture
async def server(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[LiveServer | InProcessServer]:
    """A server whose default model is a fake OpenAI endpoint asking for the calculator: in
    this process, or (a test marked ``live``) a ``nimbus serve`` process."""
    async with FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake:
        if request.node.get_closest_marker("live") is not None:
            async with live_server(database_url, fake, tmp_path) as live:
                yield live
        else:
            async with in_process_server(database_url, fake) as here:
                yield here
