"""The lean HTTP/1.1 pool behind the openai: provider, against raw loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from nimbus.adapters.llm.http import HTTPError, HTTPPool, ResponseTooLarge

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"

    yield start
    for s in servers:
        s.close()


async def test_keep_alive_reuses_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        writer.close()

    pool = HTTPPool(await serve(handler))
    for i in range(5):
        resp = await pool.post("/v1/x", b"", b"hello %d" % i)
        assert resp.status == 200 and resp.body == b"hello %d" % i
    await pool.close()
    assert connections == 1


async def test_server_closing_an_idle_connection_is_retried_transparently(serve) -> None:  # type: ignore[no-untyped-def]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # closes without saying so, as idle-timeout servers do

    pool = HTTPPool(await serve(handler))
    assert (await pool.post("/", b"", b"1")).body == b"ok"
    assert (await pool.post("/", b"", b"2")).body == b"ok"
    assert connections == 2
    await pool.close()


async def test_chunked_streaming_body(serve) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    pool = HTTPPool(await serve(handler))
    head, chunks = await pool.post_stream("/", b"", b"{}")
    assert head.status == 200
    first = await anext(chunks)
    assert first == b"first"  # delivered before the rest of the body exists
    release.set()
    assert [c async for c in chunks] == [b"second"]
    await pool.close()


async def test_connection_refused_and_garbage() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(HTTPError, match="cannot connect"):
        await HTTPPool(f"http://127.0.0.1:{port}").post("/", b"", b"")


async def test_invalid_response_is_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    pool = HTTPPool(await serve(handler))
    with pytest.raises(HTTPError, match="invalid HTTP response"):
        await pool.post("/", b"", b"{}")


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HTTPPool("ftp://example.com")


# --- the response-size cap --------------------------------------------------------------


async def test_a_body_over_the_limit_fails_and_closes_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                size = int(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size)
        writer.close()

    pool = HTTPPool(await serve(handler), max_response_bytes=4096)
    assert len((await pool.post("/", b"", b"1000")).body) == 1000
    with pytest.raises(ResponseTooLarge, match="larger than 4096 bytes"):
        await pool.post("/", b"", b"100000")
    assert len((await pool.post("/", b"", b"1000")).body) == 1000
    await pool.close()
    assert connections == 2  # the one that said too much was closed, not reused


async def test_a_stream_over_the_limit_fails(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):  # 1 MB in all, 1 kB at a time
                writer.write(b"400\r\n" + b"d" * 1024 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    pool = HTTPPool(await serve(handler), max_response_bytes=64 * 1024)
    head, chunks = await pool.post_stream("/", b"", b"{}")
    assert head.status == 200
    received = 0
    with pytest.raises(ResponseTooLarge):
        async for chunk in chunks:
            received += len(chunk)
    assert received <= 64 * 1024
    assert not pool._idle  # the connection was not kept
    await pool.close()
