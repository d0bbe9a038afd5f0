"""Shared fixtures. Tests reach nothing beyond loopback: any other connection fails loudly."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.postgres import DEFAULT_PG, answers, throwaway_cluster
from tests.redis import throwaway_redis

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(address: Any) -> None:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise OSError(f"test tried to reach {host!r}: only loopback is allowed") from None
            return
        if not ip.is_loopback:
            raise OSError(f"test tried to reach {host}: only loopback is allowed")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check(address)
    _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check(address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    yield
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAIServer]:
    """A scripted OpenAI-compatible server on a loopback port (asks for one tool call)."""
    async with FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as server:
        yield server


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A PostgreSQL server URL with rights to create databases."""
    url = os.environ.get("NIMBUS_TEST_POSTGRES_URL", DEFAULT_PG)
    if asyncio.run(answers(url)):
        yield url
        return
    with throwaway_cluster() as started:
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


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nimbus.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis of the tests' own (started from the installed ``redis-server``)."""
    with throwaway_redis() as url:
        yield url
