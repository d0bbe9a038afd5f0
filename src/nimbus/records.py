"""What the service and the stores hand each other: typed records, statuses as Literals.

Rows stay the dicts the drivers give (no copy into objects on the run path): a
``TypedDict`` names their keys and types, so that mypy checks every use. The service reads
them through these types only; a store builds them. ``StepWrite`` is the one record the
service builds for a store: what one step of a run writes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

import orjson

RunStatus = Literal["pending", "running", "success", "error", "timeout", "interrupted"]
ThreadStatus = Literal["idle", "busy", "interrupted", "error"]

#: the statuses of a run not ended yet
ACTIVE = ("pending", "running")
#: A stored event of a run's stream: (its number, its name, its data).
Event = tuple[int, str, Any]
#: How a run ended, as its waiters learn it: (status, error, the thread's values).
Outcome = tuple[str, str | None, dict[str, Any]]


def new_id() -> str:
    """A new random id (a UUID, as LangGraph's ids are)."""
    return str(uuid.uuid4())


def dump_json(value: Any) -> str:
    """JSON text of ``value`` (orjson; the standard library for what orjson refuses)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson refuses, such as integers beyond 64 bits
        return json.dumps(value)


#: 19 digits in a row: a number that may not fit in 64 bits
_LONG_NUMBER = re.compile(r"\d{19}")


def load_json(text: str | bytes) -> Any:
    """Parse JSON text (orjson; the standard library where it would lose precision)."""
    if isinstance(text, bytes):
        text = text.decode()
    if _LONG_NUMBER.search(text):  # orjson reads integers beyond 64 bits as floats
        return json.loads(text)
    return orjson.loads(text)


class Run(TypedDict):
    """A run's row."""

    run_id: str
    tenant_id: str
    thread_id: str
    assistant_id: str
    status: RunStatus
    metadata: dict[str, Any]
    kwargs: dict[str, Any]
    multitask_strategy: str
    state: Any
    error: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    lease_owner: NotRequired[str | None]
    lease_token: NotRequired[int]


class ThreadHead(TypedDict):
    """What a run needs of its thread when it is claimed: its values and checkpoint."""

    thread_id: str
    values: dict[str, Any]
    checkpoint_id: str | None


class Assistant(TypedDict):
    """An assistant's row (its current version)."""

    assistant_id: str
    tenant_id: str
    graph_id: str
    name: str
    description: str | None
    config: dict[str, Any]
    context: dict[str, Any]
    metadata: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


#: A run taken for execution, with its thread as the claim read it (None: deleted).
ClaimedRun = tuple[Run, ThreadHead | None]


@dataclass(slots=True)
class Queued:
    """A run as its queueing left it (what the routes and the scheduler act on)."""

    run: Run
    #: active runs of its thread that it interrupts (multitask ``interrupt``/``rollback``)
    interrupted: list[str] = field(default_factory=list)
    #: claimed as it was queued (by the worker with a slot reserved for it): it starts now,
    #: with ``thread`` as the claim read it
    claimed: bool = False
    thread: ThreadHead | None = None
    #: the assistant, when the queueing read it in the same statement
    assistant: Assistant | None = None
    #: an Idempotency-Key's earlier run, not a new one
    replayed: bool = False


@dataclass
class StepWrite:
    """What one step of one run writes: its state, a checkpoint of its thread, the thread's
    new values (and, at the end, status) and the run's new events."""

    tenant_id: str
    run_id: str
    thread_id: str
    state: Any  #: the run state (a JSON column value)
    values: dict[str, Any] | None = None  #: new thread values: a checkpoint is appended
    parent_id: str | None = None  #: the thread's checkpoint before this one
    #: the checkpoint's place in its chain (see
    #: :class:`nimbus.service.checkpoints.CheckpointChain`):
    #: the messages it appends to its parent's (None: stored whole), and how many
    #: checkpoints after ``origin_id`` (stored before this batch) it comes
    appended: list[Any] | None = None
    origin_id: str | None = None
    hops: int = 1
    step: int = 0
    next_nodes: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    end: tuple[str, str | None, str] | None = None  #: (run status, error, thread status)
    checkpoint_id: str = field(default_factory=new_id)  #: the appended checkpoint's id
    #: the fencing token of the writer's lease (PostgreSQL): the write lands only while the
    #: run's token is still this one
    lease_token: int = 0
    #: set by the write of a run's end: the thread has other runs waiting
    others_waiting: bool = False
