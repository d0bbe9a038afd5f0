"""Signals between Nimbus processes: PostgreSQL LISTEN/NOTIFY, or Redis pub/sub when
``NIMBUS_REDIS_URL`` is set.

What goes over it (see docs/architecture.md, "Workers and leases"): wake-ups of workers when
a run is queued, cancellations, requests to follow a run, and a run's live events for the API
replicas that stream it. Everything on it is best effort: a message lost while a connection
is down is made up for by the database (workers poll the queue, streams read stored events),
so a signal only ever makes things faster, never correct.

Channels are short names (``queued``, ``cancel``, ``watch``, ``run.<run id>``); messages are
JSON objects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import structlog

from nimbus.adapters.store.database import Database

log = structlog.get_logger("nimbus.bus")
Handler = Callable[[dict[str, Any]], None]
RECONNECT_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # back-off between reconnection attempts


class Bus:
    """Publish (batched, never blocking the caller) and subscribe by channel name."""

    #: the largest message the transport carries
    max_payload = 1 << 20

    def __init__(self) -> None:
        self._handlers: dict[str, set[Handler]] = {}
        self._outbox: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.on_reconnect: list[Callable[[], None]] = []  #: run after a lost link is back

    async def start(self) -> None:
        """Connect and start the publisher and listener tasks."""
        self._tasks = [
            asyncio.create_task(self._publisher(), name="nimbus-bus-publisher"),
            asyncio.create_task(self._listener(), name="nimbus-bus-listener"),
        ]

    async def close(self) -> None:
        """Send what is queued (briefly), then disconnect."""
        self._closed = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def publish(self, channel: str, message: dict[str, Any]) -> None:
        """Queue ``message`` for ``channel``; messages are sent in order, in batches."""
        self._outbox.append((channel, orjson.dumps(message)))
        self._wake.set()

    async def listen(self, channel: str, handler: Handler) -> None:
        """Call ``handler`` with each message of ``channel`` (from now on)."""
        handlers = self._handlers.setdefault(channel, set())
        handlers.add(handler)
        if len(handlers) == 1:
            with contextlib.suppress(Exception):  # down now: subscribed again on reconnect
                await self._subscribe(channel)

    async def unlisten(self, channel: str, handler: Handler) -> None:
        """Stop calling ``handler`` for ``channel``."""
        handlers = self._handlers.get(channel)
        if handlers is None:
            return
        handlers.discard(handler)
        if not handlers:
            del self._handlers[channel]
            with contextlib.suppress(Exception):
                await self._unsubscribe(channel)

    def _deliver(self, channel: str, payload: bytes | str) -> None:
        handlers = self._handlers.get(channel)
        if not handlers:
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("bus.bad_message", channel=channel)
            return
        for handler in list(handlers):
            try:
                handler(message)
            except Exception:
                log.exception("bus.handler_failed", channel=channel)

    def _reconnected(self) -> None:
        for hook in self.on_reconnect:
            hook()

    async def _publisher(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            batch, self._outbox = self._outbox, []
            if not batch:
                continue
            try:
                await self._send(batch)
            except Exception as exc:  # best effort: the database makes up for lost signals
                log.warning("bus.publish_failed", error=str(exc), messages=len(batch))

    # --- transport ----------------------------------------------------------------------
    async def _send(self, batch: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError

    async def _listener(self) -> None:
        raise NotImplementedError

    async def _subscribe(self, channel: str) -> None:
        raise NotImplementedError

    async def _unsubscribe(self, channel: str) -> None:
        raise NotImplementedError


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()


def _pg_channel(channel: str) -> str:
    """A PostgreSQL channel name (an identifier of at most 63 bytes) for ``channel``."""
    return "nimbus_" + channel.replace("-", "").replace(".", "_")


class PgBus(Bus):
    """LISTEN/NOTIFY: notifications are sent through the pool in one statement per batch and
    received on one dedicated connection, re-opened (and every LISTEN re-issued) when lost."""

    max_payload = 7900  # PostgreSQL's limit is 8000 bytes per notification

    def __init__(self, dsn: str, pool: asyncpg.Pool) -> None:
        super().__init__()
        self.url = dsn
        self.pool = pool
        self._conn: asyncpg.Connection | None = None
        self._names: dict[str, str] = {}  # PostgreSQL channel → ours
        self._lock = asyncio.Lock()  # one operation at a time on the listening connection

    async def _send(self, batch: list[tuple[str, bytes]]) -> None:
        await self.pool.execute(
            "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS x(c, p)",
            [_pg_channel(c) for c, _ in batch],
            [p.decode() for _, p in batch],
        )

    def _on_notify(self, _conn: object, _pid: int, name: str, payload: str) -> None:
        channel = self._names.get(name)
        if channel is not None:
            self._deliver(channel, payload)

    async def _subscribe(self, channel: str) -> None:
        name = _pg_channel(channel)
        self._names[name] = channel
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.add_listener(name, self._on_notify)

    async def _unsubscribe(self, channel: str) -> None:
        name = _pg_channel(channel)
        self._names.pop(name, None)
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.remove_listener(name, self._on_notify)

    async def _listener(self) -> None:
        failures = 0
        while not self._closed:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.url, timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                delay = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
                if failures == 0:
                    log.warning("bus.disconnected", error=str(exc))
                failures += 1
                await asyncio.sleep(delay)
                continue
            conn.add_termination_listener(_setter(lost))
            try:
                async with self._lock:
                    for channel in list(self._handlers):
                        await conn.add_listener(_pg_channel(channel), self._on_notify)
                        self._names[_pg_channel(channel)] = channel
                    self._conn = conn
                if failures:
                    log.info("bus.reconnected")
                    self._reconnected()
                failures = 0
                while not lost.is_set():
                    # asyncpg notices a dropped link only when it uses it: check now and then
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 2.0)
                    if not lost.is_set():
                        async with self._lock:
                            await conn.execute("SELECT 1", timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("bus.disconnected", error=str(exc))
            finally:
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.terminate()
            failures += 1


class RedisBus(Bus):
    """Redis pub/sub (``NIMBUS_REDIS_URL``): one connection subscribes, another publishes a
    batch as one pipeline."""

    def __init__(self, url: str) -> None:
        super().__init__()
        import redis.asyncio as redis

        # redis-py annotates from_url and PubSub.aclose in some releases and not in others:
        # called through typed names, both check alike against every release (no ignore
        # comment that one release needs and another reports as unused).
        connect: Callable[..., redis.Redis] = redis.from_url
        self.redis = connect(url, socket_connect_timeout=5, health_check_interval=10)
        self._pubsub: Any = None

    @staticmethod
    def _name(channel: str) -> str:
        return "nimbus:" + channel

    async def _send(self, batch: list[tuple[str, bytes]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, payload in batch:
                pipe.publish(self._name(channel), payload)
            await pipe.execute()

    async def _subscribe(self, channel: str) -> None:
        if self._pubsub is not None:
            await self._pubsub.subscribe(self._name(channel))

    async def _unsubscribe(self, channel: str) -> None:
        if self._pubsub is not None:
            await self._pubsub.unsubscribe(self._name(channel))

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _listener(self) -> None:
        failures = 0
        while not self._closed:
            pubsub = self.redis.pubsub()
            try:
                channels = [self._name(c) for c in self._handlers]
                await pubsub.subscribe(*(channels or [self._name("_")]))
                self._pubsub = pubsub
                if failures:
                    log.info("bus.reconnected")
                    self._reconnected()
                failures = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
                    if message is None or message["type"] != "message":
                        continue
                    name = message["channel"].decode()
                    self._deliver(name.removeprefix("nimbus:"), message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if failures == 0:
                    log.warning("bus.disconnected", error=str(exc))
                failures += 1
                await asyncio.sleep(RECONNECT_S[min(failures, len(RECONNECT_S)) - 1])
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    close: Callable[[], Awaitable[object]] = pubsub.aclose  # see __init__
                    await close()


def open_bus(db: Database, redis_url: str | None) -> Bus | None:
    """The signals between the processes that share ``db``: Redis if configured, else
    PostgreSQL's LISTEN/NOTIFY on the database's own pool; none for SQLite (one process)."""
    if db.pg_runs is None:
        return None
    if redis_url:
        return RedisBus(redis_url)
    return PgBus(db.pg_runs.url, db.pg_runs.pool)
