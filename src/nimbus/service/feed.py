"""A run's live events across processes: a stream on one API replica of a run executing on a
worker elsewhere.

The follower (API side) reads the stored events, then asks whoever executes the run to
*watch* it (``watch``: the run, the last event it has, a nonce, and the follower process's
own channel to answer on). The worker holding the run answers there with a replay of the
events it has after that one, then publishes each new event as it happens, and ``end`` once
the run's end is stored (only ``end`` for a follower that just waits for it). A worker
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
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import structlog

from nimbus.ports import Bus, RunStore
from nimbus.service.broker import RunBroker, StreamEvent

log = structlog.get_logger("nimbus.feed")
WATCH_MEMORY_S = 60.0  # how long a worker remembers a watch request for a run it may claim
WATCH_MEMORY_MAX = 100_000  # and at most this many (the oldest go first)
BACKOFF = 8  # a quiet follower looks at the database at most every BACKOFF × poll_s


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
    """Worker side: publishes the events of the runs held here to the followers that watch
    them (each follower process has a channel of its own)."""

    def __init__(self, bus: Bus, broker: RunBroker) -> None:
        self.bus, self.broker = bus, broker
        self._tokens: dict[str, int] = {}  # runs held here → lease token
        self._watchers: dict[str, dict[str, bool]] = {}  # run → {follower channel: all events}
        # watch requests for runs not held here (yet), and when each expires, oldest first
        self._requests: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self._expiry: deque[tuple[float, str]] = deque()
        broker.tap = self._on_event

    async def start(self) -> None:
        """Answer watch requests."""
        await self.bus.listen("watch", self._on_watch)

    def held(self, run_id: str, token: int) -> None:
        """A run of this worker starts (``token``: its lease's fencing token)."""
        self._tokens[run_id] = token
        now = time.monotonic()
        for until, request in self._requests.pop(run_id, ()):
            if until > now:
                self._watch(run_id, request)

    def released(self, run_id: str, ended: bool) -> None:
        """The run stops here; ``ended``: its end is stored (followers may stop)."""
        token = self._tokens.pop(run_id, 0)
        watchers = self._watchers.pop(run_id, {})
        if ended:
            for to in watchers:
                self.bus.publish(to, {"k": "end", "run": run_id, "t": token})

    def _on_watch(self, message: dict[str, Any]) -> None:
        run_id, after = message.get("run"), message.get("after", -1)
        nonce, to = message.get("n"), message.get("to")
        if not all(isinstance(v, str) for v in (run_id, nonce, to)) or not isinstance(after, int):
            return
        assert isinstance(run_id, str)
        if run_id in self._tokens:
            self._watch(run_id, message)
        else:  # perhaps ours in a moment (claimed next): remember it a while
            now = time.monotonic()
            while self._expiry and (
                self._expiry[0][0] <= now or len(self._expiry) >= WATCH_MEMORY_MAX
            ):
                _, old = self._expiry.popleft()
                kept = [r for r in self._requests.get(old, ()) if r[0] > now]
                if kept:
                    self._requests[old] = kept
                else:
                    self._requests.pop(old, None)
            self._requests.setdefault(run_id, []).append((now + WATCH_MEMORY_S, message))
            self._expiry.append((now + WATCH_MEMORY_S, run_id))

    def _watch(self, run_id: str, request: dict[str, Any]) -> None:
        to, every = request["to"], not request.get("end_only")
        watchers = self._watchers.setdefault(run_id, {})
        watchers[to] = watchers.get(to, False) or every
        token = self._tokens.get(run_id, 0)
        if not every:
            self.bus.publish(to, {"k": "replay", "run": run_id, "n": request["n"], "t": token})
            return
        backlog = [e for e in self.broker.events(run_id) if e[0] > request["after"]]
        chunks = _packed(backlog, self.bus.max_payload)
        for chunk in chunks[:-1]:
            self.bus.publish(to, {"k": "ev", "run": run_id, "t": token, "ev": chunk})
        self.bus.publish(
            to, {"k": "replay", "run": run_id, "n": request["n"], "t": token, "ev": chunks[-1]}
        )

    def _on_event(self, run_id: str, event: StreamEvent) -> None:
        watchers = self._watchers.get(run_id)
        if not watchers:
            return
        token = self._tokens.get(run_id, 0)
        chunks = _packed([event], self.bus.max_payload)
        for to, every in watchers.items():
            if every:
                for chunk in chunks:
                    self.bus.publish(to, {"k": "ev", "run": run_id, "t": token, "ev": chunk})


class FeedFollower:
    """API side: follows runs executing in other processes. Workers answer on this process's
    own channel, so following a run costs no subscription of its own."""

    def __init__(self, bus: Bus, runs: RunStore, poll_s: float = 1.0) -> None:
        self.bus, self.runs, self.poll_s = bus, runs, poll_s
        self.channel = f"feed.{uuid.uuid4().hex}"
        self._inboxes: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}

    async def start(self) -> None:
        """Listen on this process's channel."""
        await self.bus.listen(self.channel, self._dispatch)

    def _dispatch(self, message: dict[str, Any]) -> None:
        for inbox in self._inboxes.get(message.get("run") or "", ()):
            inbox.put_nowait(message)

    def _open(self, run_id: str) -> asyncio.Queue[dict[str, Any]]:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inboxes.setdefault(run_id, set()).add(inbox)
        return inbox

    def _close(self, run_id: str, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        inboxes = self._inboxes.get(run_id)
        if inboxes is not None:
            inboxes.discard(inbox)
            if not inboxes:
                del self._inboxes[run_id]

    async def follow(
        self, run_id: str, after: int, idle_s: float | None
    ) -> AsyncIterator[StreamEvent | None]:
        """The events of ``run_id`` after ``after`` until it ends; ``None`` after every
        ``idle_s`` seconds without one (heartbeats)."""
        inbox = self._open(run_id)
        try:
            last = after
            for event in await self.runs.events(run_id, last):
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
                    for event in await self.runs.events(run_id, last):
                        last = event[0]
                        quiet = 0.0
                        yield event
                    if await self.runs.ended(run_id):
                        for event in await self.runs.events(run_id, last):
                            yield event
                        return
                    nonce = self._ask(run_id, last)  # the run may be on another worker now
                    continue
                sender = message.get("t", 0)
                if not isinstance(sender, int) or sender < token:
                    continue  # an older attempt, whose worker lost the run
                token = sender
                if message.get("k") == "end":
                    for event in await self.runs.events(run_id, last):
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
            self._close(run_id, inbox)

    def _ask(self, run_id: str, after: int, end_only: bool = False) -> str:
        nonce = uuid.uuid4().hex
        self.bus.publish(
            "watch",
            {"run": run_id, "after": after, "n": nonce, "to": self.channel, "end_only": end_only},
        )
        return nonce

    async def _stored(self, run_id: str, seq: int) -> tuple[str, Any] | None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for found, name, data in await self.runs.events(run_id, seq - 1):
                if found == seq:
                    return name, data
                break
            await asyncio.sleep(0.05)
        log.warning("feed.event_missing", run_id=run_id, seq=seq)
        return None

    async def wait(self, run_id: str) -> None:
        """Until ``run_id`` is over (see :meth:`RunStore.ended`)."""
        inbox = self._open(run_id)
        wait_s = self.poll_s
        try:
            if await self.runs.ended(run_id):
                return
            while True:
                self._ask(run_id, -1, end_only=True)
                deadline = time.monotonic() + wait_s
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        message = await asyncio.wait_for(inbox.get(), left)
                    except TimeoutError:
                        break
                    if message.get("k") == "end":
                        return
                if await self.runs.ended(run_id):  # no word: maybe a signal was lost
                    return
                wait_s = min(wait_s * 2, self.poll_s * BACKOFF)
        finally:
            self._close(run_id, inbox)
