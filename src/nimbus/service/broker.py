"""Live run events in this process: every event of an active run is kept in memory and fanned
out to subscribers, so a stream joined late misses nothing (stored events cover the rest)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

StreamEvent = tuple[int, str, Any]  # (seq, event name, data)


@dataclass
class _Channel:
    events: list[StreamEvent] = field(default_factory=list)
    subscribers: set[asyncio.Queue[StreamEvent | None]] = field(default_factory=set)
    closed: bool = False
    encoded: dict[int, bytes] = field(default_factory=dict)  #: event number → its data's JSON


class RunBroker:
    """Publish/subscribe of run events, per run id."""

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}
        #: also called with each published event (the cross-process feed)
        self.tap: Callable[[str, StreamEvent], None] | None = None

    def open(self, run_id: str) -> None:
        """Start keeping events of ``run_id``."""
        self._channels.setdefault(run_id, _Channel())

    def publish(self, run_id: str, event: StreamEvent) -> None:
        """Record and deliver one event (never blocks: slow subscribers buffer)."""
        channel = self._channels.get(run_id)
        if channel is None:
            return
        channel.events.append(event)
        for queue in channel.subscribers:
            queue.put_nowait(event)
        if self.tap is not None:
            self.tap(run_id, event)

    def encoded(self, run_id: str, event: StreamEvent) -> bytes:
        """The JSON of ``event``'s data, made once for every stream of a live run (a
        thousand joins of one run encoded each event a thousand times)."""
        channel = self._channels.get(run_id)
        if channel is None:
            return orjson.dumps(event[2])
        data = channel.encoded.get(event[0])
        if data is None:
            data = channel.encoded[event[0]] = orjson.dumps(event[2])
        return data

    def events(self, run_id: str) -> list[StreamEvent]:
        """The events of a live run so far."""
        channel = self._channels.get(run_id)
        return list(channel.events) if channel is not None else []

    def close(self, run_id: str) -> None:
        """The run ended: wake subscribers and forget its events."""
        channel = self._channels.pop(run_id, None)
        if channel is None:
            return
        channel.closed = True
        for queue in channel.subscribers:
            queue.put_nowait(None)

    def is_live(self, run_id: str) -> bool:
        """Whether ``run_id`` is running in this process."""
        return run_id in self._channels

    async def subscribe(
        self, run_id: str, after: int = -1, idle_s: float | None = None
    ) -> AsyncIterator[StreamEvent | None]:
        """Events of a live run with ``seq > after``: the past ones, then as they come; with
        ``idle_s``, ``None`` after each ``idle_s`` seconds without one (for heartbeats)."""
        channel = self._channels.get(run_id)
        if channel is None:
            return
        queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        backlog = [e for e in channel.events if e[0] > after]
        channel.subscribers.add(queue)
        try:
            for event in backlog:
                yield event
            last = backlog[-1][0] if backlog else after
            while True:
                try:
                    async with asyncio.timeout(idle_s):
                        live = await queue.get()
                except TimeoutError:
                    yield None
                    continue
                if live is None:
                    return
                if live[0] > last:
                    last = live[0]
                    yield live
        finally:
            channel.subscribers.discard(queue)
