"""Limits on client connections, below the ASGI app: how many may be open at once, and how
long a client may take to send a request's head; and the descriptor limit they live within.

uvicorn's own limits leave slow clients free: ``limit_concurrency`` answers 503 only once a
request's head is complete, and no timer runs while a head is being read (the keep-alive
timer runs between requests only), so a client that sends half a head holds a descriptor for
ever, and a few thousand of them hold every descriptor the process has.

``BoundedHttpProtocol`` is uvicorn's httptools protocol with those two limits added. It
relies on internals of ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`` (uvicorn
0.55, pinned in ``requirements/``): its attributes ``connections`` (the server's set of open
connections), ``transport``, ``cycle`` and ``loop``, and the parser callbacks it defines
(``on_message_begin``, ``on_headers_complete``, ``on_message_complete``) and
``on_response_complete``. ``tests/server/test_slow_clients.py`` fails if they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from http import HTTPStatus
from typing import ClassVar

import orjson
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nimbus.settings import Settings

log = structlog.get_logger("nimbus.adapters.api")

RETRY_AFTER_S = 5  # what a refused client is asked to wait: stalled connections time out by then
# Descriptors kept for what is not a client connection nor a pool counted below: the log, the
# SQLite database and its journal, DNS lookups, `http_fetch` and the runtime's own.
SPARE_DESCRIPTORS = 256
LOG_EVERY_S = 10.0  # a flood of refused or timed-out connections is one log line per interval


def _response(status: int, detail: str, *headers: str) -> bytes:
    """A complete HTTP/1.1 JSON problem response that closes the connection."""
    body = orjson.dumps({"detail": detail, "status": status})
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *headers,
        "connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _Tally:
    """Counts an event, logged at most every ``LOG_EVERY_S`` with the count since the last."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.count = 0
        self.logged_at = 0.0

    def add(self, **fields: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= LOG_EVERY_S:
            log.warning(self.event, count=self.count, **fields)
            self.count = 0
            self.logged_at = now


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with at most ``max_connections`` open (a new one beyond
    is answered 503 and closed before its request is read) and request heads that must be
    complete within ``header_timeout_s`` (else 408 and closed).

    Use a class made by ``limited()``: uvicorn builds one instance per connection itself.
    """

    max_connections: ClassVar[int] = 10_000
    header_timeout_s: ClassVar[float] = 10.0
    busy: ClassVar[bytes] = b""
    slow: ClassVar[bytes] = b""
    refused_tally: ClassVar[_Tally] = _Tally("http.connections_refused")
    timed_out_tally: ClassVar[_Tally] = _Tally("http.head_timed_out")

    refused = False  # answered 503 at connection_made: never handed to the parser
    reading_message = False  # the parser is inside a request (its head or its body)
    head_timer: asyncio.TimerHandle | None = None

    @staticmethod
    def limited(max_connections: int, header_timeout_s: float) -> type[BoundedHttpProtocol]:
        """The protocol class to pass as ``uvicorn.Config(http=...)`` for these limits."""
        busy = _response(
            503,
            f"the server has {max_connections} connections open, its limit; retry later",
            f"retry-after: {RETRY_AFTER_S}",
        )
        slow = _response(408, f"request head not received within {header_timeout_s:g} s")

        class Limited(BoundedHttpProtocol):
            pass

        Limited.max_connections = max_connections
        Limited.header_timeout_s = header_timeout_s
        Limited.busy, Limited.slow = busy, slow
        return Limited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            # Answered before anything is read, so that a refused connection holds its
            # descriptor for an instant only. With its request unread the kernel may reset
            # the connection after the response: a client reads the response first (Linux),
            # unless it was still sending. Not added to `connections`: it neither counts
            # nor delays uvicorn's shutdown.
            self.refused = True
            self.transport = transport
            transport.write(self.busy)
            transport.close()
            self.refused_tally.add(limit=self.max_connections)
            return
        super().connection_made(transport)
        # From the accept, not the first byte: a client that connects and sends nothing
        # holds a descriptor too.
        self._start_head_timer()

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        # The first byte of a request: the keep-alive timer (uvicorn's) has stopped, the head
        # timer starts, unless already running (the first request: since the accept).
        self.reading_message = True
        self._start_head_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        # The body's time is the app's to bound (NIMBUS_BODY_TIMEOUT_S, in Guard): it knows
        # whether it reads the body at all.
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.reading_message = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A response sent before its request's body was all read (413, 415, 404 …) leaves
        # the rest of that body to come, and each byte of it stops uvicorn's keep-alive
        # timer: the rest of the body and the next head get the head's time, no more.
        if self.reading_message and self.cycle.response_complete:
            self._start_head_timer()

    def _start_head_timer(self) -> None:
        if self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        # A 408 to a client that began a request, unless a response (to an earlier request
        # of a pipeline) is being written: a 408 in its middle would corrupt it. A client
        # that sent nothing is closed without one (as nginx does).
        if self.reading_message and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(self.slow)
        self.transport.close()
        self.timed_out_tally.add(timeout_s=self.header_timeout_s)


def raise_descriptor_limit() -> int | None:
    """Raise this process's soft limit on open descriptors to its hard limit, and log it.

    Returns the limit in effect; None where there is none (or no way to know: Windows)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before != hard:
        # Fails where the hard limit is "unlimited" but the kernel's is not (macOS): the
        # soft limit then stays as it was.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = None if soft == resource.RLIM_INFINITY else soft
    log.info("server.descriptor_limit", limit=limit, was=before, hard=hard)
    return limit


def connection_cap(settings: Settings, descriptors: int | None) -> int:
    """``settings.max_connections``, lowered (with a warning) to what ``descriptors`` leave
    once the database pools, a model's connection pool and other files have their share.

    Past the descriptor limit the server could not even accept a connection to refuse it,
    nor open a database connection for the requests it holds."""
    if descriptors is None:
        return settings.max_connections
    # PostgreSQL: two pools (SQLAlchemy's and the hot path's); one model's pool is counted,
    # as most servers talk to one endpoint.
    reserve = 2 * settings.database_pool_size + settings.model_max_connections
    reserve += SPARE_DESCRIPTORS
    # Where the reserve takes most of a small limit, half of it still goes to clients: the
    # pools are bounds, seldom all open at once.
    room = max(descriptors - reserve, descriptors // 2)
    if settings.max_connections <= room:
        return settings.max_connections
    log.warning(
        "server.max_connections_lowered",
        configured=settings.max_connections,
        max_connections=room,
        descriptor_limit=descriptors,
        reserved=reserve,
    )
    return room
