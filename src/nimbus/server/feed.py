"""A run's live events across processes: a stream on one API replica of a run executing on a
worker elsewhere.

The follower (API side) listens on the run's channel, reads the stored events, then asks
whoever executes the run to *watch* it (``watch``, with a nonce and the last event it has).
The worker holding the run answers with a replay of the events it has after that one, then
publishes each new event as it happens, and ``end`` once the run's end is stored. A worker
that does not hold the run yet remembers the request for a while, in case it claims the run
next. The follower delivers events in order, each once (by event number), and falls back to
the database whenever the channel is quiet: stored events, the run's status, and a new
watch request (the run may have moved to another worker after a crash). Events of an older
attempt (a lower lease token) are ignored once a newer attempt is seen.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import structlog

from nimbus.server.broker import RunBroker, StreamEvent
from nimbus.server.bus import Bus
from nimbus.store.database import Database

log = structlog.get_logger("nimbus.feed")
WATCH_MEMORY_S = 10.0  # how long a worker remembers a watch request for a run it may claim
BACKOFF = 8  # a quiet follower looks at the database at most every BACKOFF × poll_s


def run_channel(run_id: str) -> str:
    """The channel of one run's live events."""
    return f"run.{run_id}"


def _packed(events: list[StreamEvent], limit: int) -> list[list[list[Any]]]:
    """``events`` as lists of ``[seq, name, data]`` that fit in messages of ``limit`` bytes;
    an event too large for any message goes without its data (the follower reads it from
    the database, where it is stored moments later)."""
    import orjson

    chunks: list[list[list[Any]]] = [[]]
    size = 0
    for seq, name, data in events:
        item: list[Any] = [seq, name, data]
        n = len(orjson.dumps(item)) + 1
        if n > limit - 200:
            item, n = [seq, name, None], 64
        if size + n > limit - 200 and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


class FeedPublisher:
    """Worker side: publishes the events of the runs held here that somebody watches."""

    def __init__(self, bus: Bus, broker: RunBroker) -> None:
        self.bus, self.broker = bus, broker
        self._tokens: dict[str, int] = {}  # runs held here → lease token
        self._watched: set[str] = set()
        self._requests: dict[str, tuple[float, int, str]] = {}  # run → (until, after, nonce)
        broker.tap = self._on_event

    async def start(self) -> None:
        """Answer watch requests."""
        await self.bus.listen("watch", self._on_watch)

    def held(self, run_id: str, token: int) -> None:
        """A run of this worker starts (``token``: its lease's fencing token)."""
        self._tokens[run_id] = token
        request = self._requests.pop(run_id, None)
        if request is not None and request[0] > time.monotonic():
            self._watch(run_id, request[1], request[2])

    def released(self, run_id: str, ended: bool) -> None:
        """The run stops here; ``ended``: its end is stored (followers may stop)."""
        token = self._tokens.pop(run_id, 0)
        if run_id in self._watched:
            self._watched.discard(run_id)
            if ended:
                self.bus.publish(run_channel(run_id), {"k": "end", "t": token})

    def _on_watch(self, message: dict[str, Any]) -> None:
        run_id, after, nonce = message.get("run"), message.get("after", -1), message.get("n")
        if not isinstance(run_id, str) or not isinstance(after, int) or not isinstance(nonce, str):
            return
        if run_id in self._tokens:
            self._watch(run_id, after, nonce)
        else:
            now = time.monotonic()
            self._requests = {k: v for k, v in self._requests.items() if v[0] > now}
            self._requests[run_id] = (now + WATCH_MEMORY_S, after, nonce)

    def _watch(self, run_id: str, after: int, nonce: str) -> None:
        self._watched.add(run_id)
        token = self._tokens.get(run_id, 0)
        backlog = [e for e in self.broker.events(run_id) if e[0] > after]
        chunks = _packed(backlog, self.bus.max_payload)
        channel = run_channel(run_id)
        for chunk in chunks[:-1]:
            self.bus.publish(channel, {"k": "ev", "t": token, "ev": chunk})
        self.bus.publish(channel, {"k": "replay", "n": nonce, "t": token, "ev": chunks[-1]})

    def _on_event(self, run_id: str, event: StreamEvent) -> None:
        if run_id in self._watched:
            token = self._tokens.get(run_id, 0)
            for chunk in _packed([event], self.bus.max_payload):
                self.bus.publish(run_channel(run_id), {"k": "ev", "t": token, "ev": chunk})


class FeedFollower:
    """API side: follows runs executing in other processes."""

    def __init__(self, bus: Bus, db: Database, poll_s: float = 1.0) -> None:
        self.bus, self.db, self.poll_s = bus, db, poll_s

    async def follow(
        self, run_id: str, after: int, idle_s: float | None
    ) -> AsyncIterator[StreamEvent | None]:
        """The events of ``run_id`` after ``after`` until it ends; ``None`` after every
        ``idle_s`` seconds without one (heartbeats)."""
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        channel = run_channel(run_id)
        await self.bus.listen(channel, inbox.put_nowait)
        try:
            last = after
            for event in await self.db.runs.events(run_id, last):
                last = event[0]
                yield event
            nonce = self._ask(run_id, last)
            ready, token, quiet = False, 0, 0.0
            waiting: dict[int, list[Any]] = {}  # events received, not delivered yet
            wait_s = self.poll_s
            while True:
                timeout = wait_s if not idle_s else min(wait_s, max(idle_s - quiet, 0.01))
                try:
                    message = await asyncio.wait_for(inbox.get(), timeout)
                    wait_s = self.poll_s
                except TimeoutError:
                    quiet += timeout
                    if idle_s and quiet >= idle_s:
                        quiet = 0.0
                        yield None
                    if timeout < wait_s:
                        continue  # a heartbeat came due first
                    wait_s = min(wait_s * 2, self.poll_s * BACKOFF)
                    for event in await self.db.runs.events(run_id, last):
                        last = event[0]
                        quiet = 0.0
                        yield event
                    if await self.db.runs.ended(run_id):
                        for event in await self.db.runs.events(run_id, last):
                            yield event
                        return
                    nonce = self._ask(run_id, last)  # the run may be on another worker now
                    continue
                sender = message.get("t", 0)
                if not isinstance(sender, int) or sender < token:
                    continue  # an older attempt, whose worker lost the run
                token = sender
                if message.get("k") == "end":
                    for event in await self.db.runs.events(run_id, last):
                        yield event
                    return
                for item in message.get("ev", ()):
                    if isinstance(item, list) and len(item) == 3 and item[0] > last:
                        waiting[item[0]] = item
                if message.get("k") == "replay" and message.get("n") == nonce:
                    ready = True
                if ready and waiting:
                    for seq in sorted(waiting):
                        _, name, data = waiting.pop(seq)
                        if seq <= last:
                            continue  # read from the database meanwhile
                        if data is None:  # too large for a message: stored by now, or soon
                            found = await self._stored(run_id, seq)
                            if found is None:
                                continue
                            name, data = found
                        last = seq
                        quiet = 0.0
                        yield seq, name, data
        finally:
            await self.bus.unlisten(channel, inbox.put_nowait)

    def _ask(self, run_id: str, after: int) -> str:
        nonce = uuid.uuid4().hex
        self.bus.publish("watch", {"run": run_id, "after": after, "n": nonce})
        return nonce

    async def _stored(self, run_id: str, seq: int) -> tuple[str, Any] | None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for found, name, data in await self.db.runs.events(run_id, seq - 1):
                if found == seq:
                    return name, data
                break
            await asyncio.sleep(0.05)
        log.warning("feed.event_missing", run_id=run_id, seq=seq)
        return None

    async def wait(self, run_id: str) -> None:
        """Until ``run_id`` is no longer pending or running."""
        ended = asyncio.Event()

        def on_message(message: dict[str, Any]) -> None:
            if message.get("k") == "end":
                ended.set()

        channel = run_channel(run_id)
        await self.bus.listen(channel, on_message)
        wait_s = self.poll_s
        try:
            while not await self.db.runs.ended(run_id):
                self._ask(run_id, 1 << 30)  # only the end is wanted, no events
                try:
                    await asyncio.wait_for(ended.wait(), wait_s)
                except TimeoutError:
                    wait_s = min(wait_s * 2, self.poll_s * BACKOFF)
        finally:
            await self.bus.unlisten(channel, on_message)
