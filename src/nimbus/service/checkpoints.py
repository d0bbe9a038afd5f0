"""Checkpoints stored as what they add to their parent: the rule, for every store.

Each checkpoint of a thread names its parent, the thread's checkpoint before it. Stored
whole, a thread's history grew with the square of its length: a run whose model asked for
800 tool calls in one step made 802 checkpoints, 196 MB. A checkpoint row is one of two kinds
(its ``kind`` column):

- ``full``: ``values`` holds the thread's values whole;
- ``append``: ``values`` is ``{"messages": [...]}``, the messages appended to its parent's.

A checkpoint is ``append`` when its values are its parent's with messages appended (the steps
of a run, a state update that adds messages), and ``full`` otherwise: a thread's first, a
state update that replaces a message, one whose parent was never stored (its write failed).
``seq`` numbers the checkpoints of a chain (the parent's plus one), and every
:data:`SNAPSHOT_EVERY`-th one is ``full`` too: reading any checkpoint reads at most
``SNAPSHOT_EVERY - 1`` appends after a full one, whatever the thread's length.

Rows written before this scheme are ``full`` with no ``seq``; a checkpoint after one of them
counts from 0 (so it is ``full`` as well).

:func:`stored_kind` is the rule; PostgreSQL's batch statement of run steps
(:mod:`nimbus.adapters.store.writer`) applies the same one in SQL, so that a batch holding
several steps of one run needs no read in between. Reading them back is the stores' own
(:mod:`nimbus.adapters.store.checkpoints`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import orjson

from nimbus.records import StepWrite

#: Every how many checkpoints of a chain one is stored whole (see docs/benchmarks.md,
#: ``nimbus bench checkpoints``: storage falls with it, reads at any checkpoint barely rise).
SNAPSHOT_EVERY = 64

Kind = Literal["full", "append"]


def messages_of(values: Any) -> list[Any] | None:
    """The message list of thread values that hold nothing else, or None."""
    if isinstance(values, dict) and values.keys() == {"messages"}:
        messages = values["messages"]
        return messages if isinstance(messages, list) else None
    return None


def _canonical(value: Any) -> bytes:
    """JSON text with keys sorted: equal for values that are equal as JSON."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson refuses, such as integers beyond 64 bits
        return json.dumps(value, sort_keys=True).encode()


def appended(
    parent: list[Any] | None, values: dict[str, Any], *, same_objects: bool = False
) -> list[Any] | None:
    """The messages ``values`` appends to a checkpoint whose messages are ``parent``; None
    when ``values`` differs from it otherwise, or ``parent`` is unknown (None).

    The head of ``values`` must equal ``parent`` as JSON: key order aside, since the copy a
    writer has (a thread row) comes from PostgreSQL's ``jsonb``, which sorts keys. With
    ``same_objects`` (the messages of a checkpoint the caller wrote itself), the head is
    compared with ``==``, which finds identical objects equal at once."""
    messages = messages_of(values)
    if parent is None or messages is None or len(messages) < len(parent):
        return None
    head = messages[: len(parent)]
    equal = head == parent if same_objects else _canonical(head) == _canonical(parent)
    return messages[len(parent) :] if equal else None


def stored_kind(seq: int, adds: list[Any] | None, parent_stored: bool) -> Kind:
    """How a checkpoint at ``seq`` of its chain is stored: as the messages ``adds`` appends
    to its parent, unless it changes more (None), its parent is not stored, or its ``seq``
    is a multiple of :data:`SNAPSHOT_EVERY`."""
    if adds is None or not parent_stored or seq % SNAPSHOT_EVERY == 0:
        return "full"
    return "append"


class CheckpointChain:
    """The checkpoints one writer (a run's attempt) appends to a thread, each after the one
    before, from the thread's checkpoint when it started (``origin``, already stored).

    :meth:`extend` fills a step write's place in the chain; the database then numbers it
    (``seq`` = the origin's plus ``hops``) and picks its kind by :func:`stored_kind`, so
    that a batch holding several steps of one run needs no read in between."""

    def __init__(self, origin: str | None, values: dict[str, Any] | None) -> None:
        self.origin = origin
        self.parent_id = origin  #: the newest checkpoint of the chain
        self.hops = 0  #: checkpoints written after the origin
        self._parent = messages_of(values) if origin is not None else None
        self._ours = False  # whether _parent holds objects of this writer's own values

    def extend(self, write: StepWrite, values: dict[str, Any]) -> None:
        """Make ``write`` append the checkpoint of ``values`` to the chain."""
        self.hops += 1
        write.values, write.parent_id = values, self.parent_id
        write.origin_id, write.hops = self.origin, self.hops
        write.appended = appended(self._parent, values, same_objects=self._ours)
        self.parent_id = write.checkpoint_id
        self._parent, self._ours = messages_of(values), True
