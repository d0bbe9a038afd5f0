"""Slow clients against a live server: connections beyond NIMBUS_MAX_CONNECTIONS are refused
at once (503), request heads and bodies that do not arrive in time are cut off (408), and
the process's descriptor limit is raised at start. SQLite: the limits are the database's
business nowhere."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from nimbus.adapters.api.connections import connection_cap
from nimbus.settings import Settings
from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import LiveServer, live_server

MAX_CONNECTIONS = 200
HEADER_TIMEOUT_S = 3.0  # long enough for 300 connections to be accepted on a loaded machine
BODY_TIMEOUT_S = 1.0
DEADLINE_S = 60.0  # what a wait on the server may take before the test fails


@contextlib.contextmanager
def lowered_descriptor_limit() -> Iterator[None]:
    """This process's soft descriptor limit below its hard one while a server is started, so
    that the server's start shows it raises its own (children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 1024) if hard > 1024 else hard // 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[LiveServer]:
    """A live server on SQLite with small connection limits and timeouts, started with a
    soft descriptor limit below the hard one."""
    async with contextlib.AsyncExitStack() as stack:
        fake = await stack.enter_async_context(FakeOpenAIServer())
        with lowered_descriptor_limit():
            live = await stack.enter_async_context(
                live_server(
                    f"sqlite:///{tmp_path}/n.db",
                    fake,
                    tmp_path,
                    NIMBUS_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                    NIMBUS_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
                    NIMBUS_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                )
            )
        yield live
    assert "Traceback" not in live.logs()


def port(live: LiveServer) -> int:
    return int(live.url.rsplit(":", 1)[1])


async def connect(live: LiveServer, data: bytes) -> socket.socket:
    """A raw connection to the server that has sent ``data``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port(live)))
    # A refused connection may be closed before its data is sent: its reply tells.
    with contextlib.suppress(ConnectionError):
        await loop.sock_sendall(sock, data)
    return sock


@dataclass
class Reply:
    """What the server sent on a connection until it closed it, and when it did."""

    data: bytes
    seconds: float  # from the wait's start to the end of the connection

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1]) if self.data else 0

    def problem(self, status: int, *words: str) -> dict[str, object]:
        """Assert a complete JSON problem response with ``status`` that closes the connection."""
        head, _, body = self.data.partition(b"\r\n\r\n")
        assert self.status == status, self.data
        lines = head.decode().lower().splitlines()
        assert "content-type: application/json" in lines, head
        assert "connection: close" in lines, head
        assert f"content-length: {len(body)}" in lines, head
        problem: dict[str, object] = orjson.loads(body)
        assert problem["status"] == status, problem
        for word in words:
            assert word in str(problem["detail"]), problem
        return problem


async def read_until_closed(sock: socket.socket, since: float) -> Reply:
    """Everything the server sends until it closes (a reset after a response counts as a
    close: the kernel resets a connection closed with part of its request unread)."""
    loop = asyncio.get_running_loop()
    chunks = []
    try:
        async with asyncio.timeout(DEADLINE_S):
            while chunk := await loop.sock_recv(sock, 65536):
                chunks.append(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return Reply(b"".join(chunks), time.monotonic() - since)


def descriptor_limits(pid: int) -> tuple[int, int]:
    """The soft and hard limits on open descriptors of process ``pid`` (Linux)."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


async def healthy(live: LiveServer) -> None:
    """An authenticated request is answered."""
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        r = await client.post("/assistants/search", json={}, headers={"x-api-key": live.admin_key})
    assert r.status_code == 200, r.text


async def test_connections_beyond_the_cap_get_503_at_once_stalled_heads_are_closed(
    slow: LiveServer,
) -> None:
    started = time.monotonic()
    half_head = b"GET /ok HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: "  # and then nothing
    socks = await asyncio.gather(*(connect(slow, half_head) for _ in range(300)))
    replies = await asyncio.gather(*(read_until_closed(s, started) for s in socks))

    assert slow.process.poll() is None
    refused = [r for r in replies if r.status == 503]
    stalled = [r for r in replies if r.status != 503]
    # The server never held more than its cap; those beyond it were answered at once,
    # before any stalled head had timed out.
    assert len(stalled) <= MAX_CONNECTIONS and len(refused) >= 300 - MAX_CONNECTIONS
    for reply in refused:
        reply.problem(503, "limit")
        assert b"\r\nretry-after: " in reply.data.lower()
        assert reply.seconds < HEADER_TIMEOUT_S, reply.seconds
    # The stalled ones were closed by the server, with a 408, once their time was up.
    for reply in stalled:
        reply.problem(408, "request head")
        assert reply.seconds >= HEADER_TIMEOUT_S * 0.9, reply.seconds
    await healthy(slow)


async def test_a_stalled_body_gets_408_and_blocks_no_one(slow: LiveServer) -> None:
    head = (
        "POST /threads HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"x-api-key: {slow.admin_key}\r\ncontent-length: 100\r\n\r\n"
    )
    started = time.monotonic()
    sock = await connect(slow, head.encode() + b'{"metadata": ')  # and then nothing
    stalled = asyncio.create_task(read_until_closed(sock, started))
    await healthy(slow)  # meanwhile, another client is served

    reply = await stalled
    reply.problem(408, "request body")
    assert reply.seconds >= BODY_TIMEOUT_S * 0.9, reply.seconds
    logged = [orjson.loads(line) for line in slow.logs().splitlines() if line.startswith("{")]
    assert any(e.get("path") == "/threads" and e.get("status") == 408 for e in logged)
    await healthy(slow)


async def test_an_unread_body_may_not_trickle_forever(slow: LiveServer) -> None:
    """A body the server answered without reading (413 here) gets no more time than a head:
    each byte of it would otherwise restart uvicorn's 5 s keep-alive timer."""
    head = (
        "POST /threads HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"x-api-key: {slow.admin_key}\r\ncontent-length: 100000000\r\n\r\n"
    )
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = await connect(slow, head.encode())
    received = b""
    with contextlib.suppress(ConnectionError):  # a byte sent after the close: a reset
        async with asyncio.timeout(DEADLINE_S):
            while b"HTTP/1.1 413" not in received:  # the answer first, the body unread
                received += await loop.sock_recv(sock, 65536)
            while True:  # a byte every 0.2 s, until the server closes
                await loop.sock_sendall(sock, b" ")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        if not await loop.sock_recv(sock, 65536):
                            break
    sock.close()
    elapsed = time.monotonic() - started
    assert b"HTTP/1.1 413" in received
    assert HEADER_TIMEOUT_S * 0.9 <= elapsed < DEADLINE_S, elapsed


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc (Linux)")
async def test_the_descriptor_limit_is_raised_at_start(slow: LiveServer) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert descriptor_limits(slow.process.pid) == (hard, hard)
    assert "server.descriptor_limit" in slow.logs()


def test_the_connection_cap_leaves_descriptors_for_the_pools_and_files() -> None:
    settings = Settings(max_connections=10_000, database_pool_size=20, model_max_connections=1000)
    # 4096 descriptors: 2 database pools of 20, 1000 model connections, 256 spare
    assert connection_cap(settings, 4096) == 4096 - 40 - 1000 - 256
    assert connection_cap(settings, 1_048_576) == 10_000
    assert connection_cap(settings, None) == 10_000  # no limit known: as configured
    assert connection_cap(settings, 1024) == 512  # a reserve past the limit: half of it
