"""A lean HTTP/1.1 client for the model hot path: keep-alive connections to one origin over
asyncio, responses parsed by llhttp (``httptools``, the parser uvicorn uses).

Why not aiohttp or httpx: ``nimbus bench runtime`` measured the client CPU of each model call,
and a general-purpose client spends most of a run's CPU on features a model endpoint does
not need (cookies, redirects, proxies, multipart, middlewares). This does only what a
chat-completions call needs — POST a JSON body, read a JSON body or an event stream — and
leaves parsing to llhttp. Plain ``http`` and ``https`` (TLS by :mod:`ssl`) are supported.

A response (head and body, streamed or not) is cut off past ``max_response_bytes``: an
endpoint that never stops sending must not fill the server's memory. The count is one
addition per read from the socket.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import httptools

#: The largest response read by default: far above any chat completion.
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class HTTPError(Exception):
    """The connection failed or the server broke the HTTP protocol."""


class ResponseTooLarge(HTTPError):
    """The response grew past the pool's ``max_response_bytes``; its connection is closed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the response is larger than {limit} bytes")
        self.limit = limit


@dataclass(slots=True)
class Response:
    """A response head, and the whole body unless it is being streamed."""

    status: int
    headers: dict[str, str]
    body: bytes = b""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, max_response_bytes: int) -> None:
        self.max_response_bytes = max_response_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = False
        self._reset(streaming=False)

    def _reset(self, *, streaming: bool) -> None:
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[Response] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []
        self.streaming = streaming
        self.chunks: asyncio.Queue[bytes | None] | None = asyncio.Queue() if streaming else None
        self.keep_alive = True
        self.got_bytes = False
        self.received = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.received += len(data)
        if self.received > self.max_response_bytes:
            self._fail(ResponseTooLarge(self.max_response_bytes))
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HTTPError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HTTPError(f"connection closed by the server{f': {exc}' if exc else ''}"))

    def _fail(self, error: HTTPError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
        if not self.done.done():
            self.done.set_exception(error)
            if self.chunks is not None:
                self.chunks.put_nowait(None)
        # Mark exceptions as retrieved: a caller that already has its answer does not care.
        for future in (self.head, self.done):
            if future.done() and not future.cancelled():
                future.exception()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.streaming and not self.head.done():
            self.head.set_result(Response(self.parser.get_status_code(), self.headers))

    def on_body(self, body: bytes) -> None:
        if self.chunks is not None:
            self.chunks.put_nowait(body)
        else:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        if not self.head.done():
            body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            self.head.set_result(Response(self.parser.get_status_code(), self.headers, body))
        if not self.done.done():
            self.done.set_result(None)
        if self.chunks is not None:
            self.chunks.put_nowait(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HTTPPool:
    """Keep-alive HTTP/1.1 connections to the origin of ``base_url``."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 1000,
        connect_timeout_s: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        default_port = (parts.scheme == "https" and self.port == 443) or self.port == 80
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not default_port:
            self.host_header = f"[{self.host}]:{self.port}"
        self.connect_timeout_s = connect_timeout_s
        self.max_response_bytes = max_response_bytes
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(max_connections)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    partial(_Connection, self.max_response_bytes),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise HTTPError(f"connect timed out after {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            raise HTTPError(f"cannot connect: {exc.strerror or exc}") from None
        return conn

    def _checkout(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _send(
        self, path: str, headers: bytes, body: bytes, *, streaming: bool
    ) -> tuple[_Connection, Response]:
        """Send a POST; a reused connection that the server had closed is retried once."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host_header}\r\nContent-Length: {len(body)}\r\n"
        ).encode("latin-1")
        while True:
            conn = self._checkout()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            conn._reset(streaming=streaming)
            conn.used = True
            assert conn.transport is not None
            conn.transport.write(head + headers + b"\r\n" + body)
            try:
                return conn, await conn.head
            except HTTPError:
                conn.close()
                if reused and not conn.got_bytes:
                    continue  # the server closed an idle connection: not a failed request
                raise
            except BaseException:
                conn.close()
                raise

    def _release(self, conn: _Connection) -> None:
        if conn.keep_alive and not conn.closed and conn.done.done() and not conn.done.exception():
            self._idle.append(conn)
        else:
            conn.close()

    async def post(self, path: str, headers: bytes, body: bytes) -> Response:
        """POST ``body`` and read the whole response. ``headers`` are raw header lines."""
        async with self._slots:
            conn, response = await self._send(path, headers, body, streaming=False)
            self._release(conn)
            return response

    async def post_stream(
        self, path: str, headers: bytes, body: bytes
    ) -> tuple[Response, AsyncIterator[bytes]]:
        """POST and return the response head and an iterator over body chunks."""
        await self._slots.acquire()
        try:
            conn, response = await self._send(path, headers, body, streaming=True)
        except BaseException:
            self._slots.release()
            raise
        return response, self._chunks(conn)

    async def _chunks(self, conn: _Connection) -> AsyncIterator[bytes]:
        assert conn.chunks is not None
        try:
            while (chunk := await conn.chunks.get()) is not None:
                yield chunk
            await conn.done  # raises if the body ended with an error
        finally:
            if not conn.done.done():
                conn.close()  # abandoned mid-body: the connection cannot be reused
            self._release(conn)
            self._slots.release()

    async def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._idle.pop().close()
