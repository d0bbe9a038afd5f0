"""The statements of every run on SQLite, on the raw ``sqlite3`` connection.

Queueing a run, claiming it and writing its steps are most of what the embedded server asks
of its database, and SQLAlchemy's Core costs several times what SQLite itself spends on such
a statement (building parameters, type processing, result objects). These few statements
run here as plain SQL on the engine's one connection (see
:mod:`nimbus.adapters.store.sqlite_connection`); the rest of the store keeps to SQLAlchemy. It
is to SQLite what :mod:`nimbus.adapters.store.postgres_runs` is to PostgreSQL.

The connection is SQLAlchemy's, shared in turn: a transaction here runs start to end without
giving the event loop up, and only while nobody holds the connection from the engine's pool
(or after taking it from the pool, when somebody does). Values are stored exactly as
SQLAlchemy stores them (JSON text, ``YYYY-MM-DD HH:MM:SS.ffffff`` UTC timestamps), so either
side reads what the other wrote.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store.common import now, pending_run
from nimbus.adapters.store.sqlite_connection import InLoopConnection
from nimbus.exceptions import ThreadBusy
from nimbus.records import (
    Assistant,
    ClaimedRun,
    Queued,
    Run,
    ThreadHead,
    dump_json,
    load_json,
    new_id,
)
from nimbus.service.checkpoints import stored_kind

if TYPE_CHECKING:
    from nimbus.records import StepWrite

T = TypeVar("T")

_SET_VALUES = (
    'UPDATE threads SET "values" = ?, checkpoint_id = ?, updated_at = ? '
    "WHERE tenant_id = ? AND thread_id = ?"
)
# A run's end: the thread goes to the given status, or stays busy while another run of it is
# active; the run takes its final status unless it was interrupted meanwhile.
_THREAD_AFTER = (
    "status = CASE WHEN EXISTS (SELECT 1 FROM runs WHERE tenant_id = :tenant AND "
    "thread_id = :thread AND run_id != :run AND status IN ('pending', 'running')) "
    "THEN 'busy' ELSE :status END, updated_at = :stamp"
)
_END_THREAD = (
    f"UPDATE threads SET {_THREAD_AFTER} WHERE tenant_id = :tenant AND thread_id = :thread"
)
_END_THREAD_VALUES = (
    f'UPDATE threads SET {_THREAD_AFTER}, "values" = :values, checkpoint_id = :checkpoint '
    "WHERE tenant_id = :tenant AND thread_id = :thread"
)
_END_RUN = (
    "UPDATE runs SET status = ?, error = ?, state = ?, updated_at = ? "
    "WHERE run_id = ? AND status != 'interrupted' RETURNING run_id"
)
_SET_STATE = "UPDATE runs SET state = ?, updated_at = ? WHERE run_id = ?"
_INSERT_CHECKPOINT = (
    "INSERT INTO checkpoints (checkpoint_id, tenant_id, thread_id, parent_id, run_id, step, "
    'kind, seq, "values", metadata, next, created_at) '
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_CHECKPOINT_SEQ = "SELECT seq FROM checkpoints WHERE checkpoint_id = ?"
_INSERT_EVENT = (
    "INSERT INTO run_events (run_id, tenant_id, seq, event, data) VALUES (?, ?, ?, ?, ?)"
)
_BUSY = (
    "UPDATE threads SET status = 'busy', updated_at = ? WHERE tenant_id = ? AND thread_id = ? "
    "RETURNING thread_id"
)
_ACTIVE_RUNS = (
    "SELECT run_id FROM runs WHERE tenant_id = ? AND thread_id = ? "
    "AND status IN ('pending', 'running')"
)
_RUN_COLUMNS = (
    "run_id",
    "tenant_id",
    "thread_id",
    "assistant_id",
    "status",
    "metadata",
    "kwargs",
    "multitask_strategy",
    "state",
    "error",
    "attempts",
    "created_at",
    "updated_at",
    "lease_owner",
    "lease_token",
)
_INSERT_RUN = (
    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' for _ in _RUN_COLUMNS)})"
)
_INSERT_ATTEMPT = (
    "INSERT INTO run_attempts (run_id, attempt, tenant_id, worker, claimed_at) "
    "VALUES (?, ?, ?, NULL, ?)"
)
_CLAIM = (
    "UPDATE runs SET status = 'running', attempts = attempts + 1, updated_at = ? "
    f"WHERE run_id = ? AND status IN ('pending', 'running') RETURNING {', '.join(_RUN_COLUMNS)}"
)
_THREAD_COLUMNS = (
    "thread_id",
    "tenant_id",
    "status",
    "metadata",
    "values",
    "checkpoint_id",
    "created_at",
    "updated_at",
)
_GET_THREAD = (
    "SELECT " + ", ".join(f'"{c}"' for c in _THREAD_COLUMNS) + " FROM threads "
    "WHERE tenant_id = ? AND thread_id = ?"
)
_ASSISTANT_COLUMNS = (
    "assistant_id",
    "tenant_id",
    "graph_id",
    "name",
    "description",
    "config",
    "context",
    "metadata",
    "version",
    "created_at",
    "updated_at",
)
_GET_ASSISTANT = (
    f"SELECT {', '.join(_ASSISTANT_COLUMNS)} FROM assistants "
    "WHERE tenant_id = ? AND assistant_id = ?"
)
# An assistant named by its graph (the first one made from it) or by its name (the newest of
# that name), as :meth:`nimbus.adapters.store.assistants.AssistantStore.find` resolves them.
_FIND_ASSISTANT = tuple(
    f"SELECT {', '.join(_ASSISTANT_COLUMNS)} FROM assistants "
    f"WHERE tenant_id = ? AND {column} = ? ORDER BY created_at {order} LIMIT 1"
    for column, order in (("graph_id", "ASC"), ("name", "DESC"))
)
_JSON_COLUMNS = {"metadata", "kwargs", "state", "values", "config", "context"}
_TIME_COLUMNS = {"created_at", "updated_at"}


def stamp_text(stamp: datetime) -> str:
    """A timestamp as SQLAlchemy stores it on SQLite (UTC, no zone)."""
    if stamp.utcoffset():
        stamp = stamp.astimezone(UTC)
    return stamp.replace(tzinfo=None).isoformat(" ", "microseconds")


def _read(columns: tuple[str, ...], values: tuple[Any, ...]) -> dict[str, Any]:
    """A row as the SQLAlchemy stores return it: JSON parsed, timestamps aware."""
    out = dict(zip(columns, values, strict=True))
    for key in _JSON_COLUMNS.intersection(out):
        if out[key] is not None:
            out[key] = load_json(out[key])
    for key in _TIME_COLUMNS:
        out[key] = datetime.fromisoformat(out[key]).replace(tzinfo=UTC)
    return out


class SqliteRuns:
    """Queueing, claiming and step writes on SQLite (see the module's docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._conn: InLoopConnection | None = None  # the pool's one connection, once seen

    async def transact(self, work: Callable[..., T], *args: Any) -> T:
        """``work(connection, *args)`` in one write transaction, committed when it returns
        and rolled back when it raises. It must not wait on anything: it runs on the event
        loop's thread, holding the process's only database connection."""
        return await self.use(_transact, work, args)

    async def use(self, work: Callable[..., T], *args: Any) -> T:
        """``work(connection, *args)`` with the connection to itself (see :meth:`transact`)."""
        pool = self.engine.sync_engine.pool
        known = self._conn
        if known is not None and known.is_open() and not pool.checkedout():  # type: ignore[attr-defined]
            # nobody holds it, and nothing can take it before this returns
            return work(known.raw, *args)
        async with self.engine.connect() as conn:  # waits for whoever holds it
            driver = (await conn.get_raw_connection()).driver_connection
            assert isinstance(driver, InLoopConnection)
            self._conn = driver
            return work(driver.raw, *args)

    async def assistant(self, tenant_id: str, assistant_id: str) -> dict[str, Any] | None:
        """One assistant of the tenant by id, or None."""
        return await self.use(_assistant, tenant_id, assistant_id)

    async def find_assistant(self, tenant_id: str, id_or_name: str) -> dict[str, Any] | None:
        """One assistant of the tenant by id, graph or name (see ``_FIND_ASSISTANT``)."""
        return await self.use(_find_assistant, tenant_id, id_or_name)

    async def write_steps(self, steps: list[StepWrite]) -> list[str | None]:
        """Write a batch of steps in one transaction (see :mod:`nimbus.adapters.store.writer`)."""
        return await self.transact(_write_steps, steps)

    async def queue_run(
        self,
        tenant_id: str,
        thread_id: str,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        owner: str | None = None,
        *,
        with_assistant: bool = False,
    ) -> Queued | None:
        """Queue a run on an existing thread; None when there is no such thread (the caller
        then takes the general path, which may create it). With ``owner`` (a worker of this
        process), a run that can start at once (no other run of its thread is active) is
        claimed in the same transaction: it comes back running, and ``claimed`` with its
        thread. As with any claim on SQLite (one process), its attempt records
        no worker. ``with_assistant``: ``assistant_id`` names the assistant by id, graph or
        name (as :meth:`~nimbus.adapters.store.assistants.AssistantStore.find` does); it is read in
        the same transaction and comes back as ``assistant``, the run is queued for it; None
        (nothing queued) when the tenant has no such assistant."""
        return await self.transact(
            _queue_run,
            tenant_id,
            thread_id,
            assistant_id,
            kwargs,
            metadata,
            multitask_strategy,
            owner,
            with_assistant,
        )

    async def claim(self, run_id: str) -> ClaimedRun | None:
        """See :meth:`nimbus.adapters.store.runs.RunStore.claim`."""
        return await self.transact(_claim, run_id)


def _transact(conn: sqlite3.Connection, work: Callable[..., T], args: tuple[Any, ...]) -> T:
    conn.execute("BEGIN IMMEDIATE")  # the write lock now: no upgrade from a reader later
    try:
        result = work(conn, *args)
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    return result


def _write_steps(conn: sqlite3.Connection, steps: list[StepWrite]) -> list[str | None]:
    """Thread rows are written before run rows, in thread order, as queueing a run does;
    several steps of one run are written in the order they came."""
    stamp = now()
    text = stamp_text(stamp)
    results: list[str | None] = [None] * len(steps)
    order = sorted(range(len(steps)), key=lambda i: (steps[i].tenant_id, steps[i].thread_id))
    ordered = [steps[i] for i in order]
    values = {id(s): dump_json(s.values) for s in ordered if s.values is not None}
    conn.executemany(
        _SET_VALUES,
        [
            (values[id(s)], s.checkpoint_id, text, s.tenant_id, s.thread_id)
            for s in ordered
            if s.values is not None and s.end is None
        ],
    )
    for s in ordered:
        if s.end is not None:
            params = {
                "tenant": s.tenant_id,
                "thread": s.thread_id,
                "run": s.run_id,
                "status": s.end[2],
                "stamp": text,
            }
            if s.values is None:
                conn.execute(_END_THREAD, params)
            else:
                params.update(values=values[id(s)], checkpoint=s.checkpoint_id)
                conn.execute(_END_THREAD_VALUES, params)
    conn.executemany(
        _SET_STATE, [(dump_json(s.state), text, s.run_id) for s in ordered if s.end is None]
    )
    for i, s in zip(order, ordered, strict=True):
        if s.end is not None:
            state = dump_json(s.state)
            status, error, _ = s.end
            ended = conn.execute(_END_RUN, (status, error, state, text, s.run_id)).fetchone()
            if ended is None:  # cancelled meanwhile: it stays interrupted
                conn.execute(_SET_STATE, (state, text, s.run_id))
            results[i] = status if ended is not None else "interrupted"
    rows: list[tuple[Any, ...]] = []
    batch: set[str] = set()  # the checkpoints of this batch so far
    for n, s in enumerate((s for s in ordered if s.values is not None), 1):
        seq, parent_stored = _chain_place(conn, s, batch)
        kind = stored_kind(seq, s.appended, parent_stored)
        rows.append(
            (
                s.checkpoint_id,
                s.tenant_id,
                s.thread_id,
                s.parent_id,
                s.run_id,
                s.step,
                kind,
                seq,
                values[id(s)] if kind == "full" else dump_json({"messages": s.appended}),
                dump_json({"run_id": s.run_id, "step": s.step, "source": "loop"}),
                dump_json(s.next_nodes),
                stamp_text(stamp + timedelta(microseconds=n)),  # the history's order
            )
        )
        batch.add(s.checkpoint_id)
    conn.executemany(_INSERT_CHECKPOINT, rows)
    conn.executemany(
        _INSERT_EVENT,
        [
            (s.run_id, s.tenant_id, seq, name, dump_json(data))
            for s in ordered
            for seq, name, data in s.events
        ],
    )
    return results


def _chain_place(conn: sqlite3.Connection, s: StepWrite, batch: set[str]) -> tuple[int, bool]:
    """A step's checkpoint's ``seq`` (its origin's plus its hops) and whether its parent is
    stored (before, or earlier in this ``batch``); see
    :class:`~nimbus.service.checkpoints.CheckpointChain`."""
    origin = None
    if s.origin_id is not None:
        origin = conn.execute(_CHECKPOINT_SEQ, (s.origin_id,)).fetchone()
    seq = (-1 if origin is None or origin[0] is None else origin[0]) + s.hops
    if s.parent_id is None or s.appended is None:
        return seq, False  # stored whole whatever its parent
    if s.parent_id in batch or (s.parent_id == s.origin_id and origin is not None):
        return seq, True
    return seq, conn.execute(_CHECKPOINT_SEQ, (s.parent_id,)).fetchone() is not None


def queue_in(
    conn: Connection,
    run_id: str,
    tenant_id: str,
    thread_id: str,
    assistant_id: str,
    kwargs: dict[str, Any],
    metadata: dict[str, Any],
    multitask_strategy: str,
    owner: str | None,
) -> Queued | None:
    """The queueing of :func:`_queue_run`, inside a transaction SQLAlchemy holds (the general
    path of :meth:`~nimbus.adapters.store.runs.RunStore.create`: synchronous, for
    ``run_sync``), on the same connection."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, InLoopConnection)
    return _queue_run(
        driver.raw,
        tenant_id,
        thread_id,
        assistant_id,
        kwargs,
        metadata,
        multitask_strategy,
        owner,
        run_id=run_id,
    )


def _queue_run(
    conn: sqlite3.Connection,
    tenant_id: str,
    thread_id: str,
    assistant_id: str,
    kwargs: dict[str, Any],
    metadata: dict[str, Any],
    multitask_strategy: str,
    owner: str | None,
    with_assistant: bool = False,
    run_id: str | None = None,
) -> Queued | None:
    """The rule of queueing a run on a thread (SQLite's one form of it): the thread marked
    busy (None: no such thread), its active runs against ``multitask_strategy`` (reject:
    ThreadBusy; interrupt and rollback: marked interrupted), the run inserted, and claimed
    by ``owner`` at once when no other run of the thread is active."""
    assistant = None
    if with_assistant:
        if (assistant := _find_assistant(conn, tenant_id, assistant_id)) is None:
            return None
        assistant_id = assistant["assistant_id"]
    stamp = now()
    text = stamp_text(stamp)
    # Marking the thread busy also takes the lock of the whole queueing.
    if conn.execute(_BUSY, (text, tenant_id, thread_id)).fetchone() is None:
        return None
    active = [r[0] for r in conn.execute(_ACTIVE_RUNS, (tenant_id, thread_id))]
    interrupted: list[str] = []
    if active:
        if multitask_strategy == "reject":
            raise ThreadBusy(thread_id)  # rolled back: the thread's status is unchanged
        if multitask_strategy in ("interrupt", "rollback"):
            conn.executemany(
                "UPDATE runs SET status = 'interrupted', updated_at = ? WHERE run_id = ?",
                [(text, run_id) for run_id in active],
            )
            interrupted = active
    run = pending_run(
        run_id or new_id(),
        tenant_id,
        thread_id,
        assistant_id,
        kwargs,
        metadata,
        multitask_strategy,
        stamp,
    )
    claimed = owner is not None and not active
    if claimed:
        run["status"], run["attempts"] = "running", 1
    values: dict[str, Any] = dict(run)
    conn.execute(
        _INSERT_RUN,
        tuple(
            text
            if c in _TIME_COLUMNS
            else dump_json(values[c])
            if c in _JSON_COLUMNS and values[c] is not None
            else values[c]
            for c in _RUN_COLUMNS
        ),
    )
    queued = Queued(run, interrupted, claimed, assistant=cast(Assistant | None, assistant))
    if claimed:
        conn.execute(_INSERT_ATTEMPT, (run["run_id"], 1, tenant_id, text))
        queued.thread = _thread(conn, tenant_id, thread_id)
    return queued


def _claim(conn: sqlite3.Connection, run_id: str) -> ClaimedRun | None:
    text = stamp_text(now())
    found = conn.execute(_CLAIM, (text, run_id)).fetchone()
    if found is None:
        return None
    run = _read(_RUN_COLUMNS, found)
    tenant_id, thread_id = run["tenant_id"], run["thread_id"]
    conn.execute(_BUSY, (text, tenant_id, thread_id)).fetchall()
    conn.execute(_INSERT_ATTEMPT, (run_id, run["attempts"], tenant_id, text))
    return cast(Run, run), _thread(conn, tenant_id, thread_id)


def _thread(conn: sqlite3.Connection, tenant_id: str, thread_id: str) -> ThreadHead | None:
    found = conn.execute(_GET_THREAD, (tenant_id, thread_id)).fetchone()
    return None if found is None else cast(ThreadHead, _read(_THREAD_COLUMNS, found))


def _assistant(
    conn: sqlite3.Connection, tenant_id: str, assistant_id: str
) -> dict[str, Any] | None:
    found = conn.execute(_GET_ASSISTANT, (tenant_id, assistant_id)).fetchone()
    return None if found is None else _read(_ASSISTANT_COLUMNS, found)


def _find_assistant(
    conn: sqlite3.Connection, tenant_id: str, id_or_name: str
) -> dict[str, Any] | None:
    """An assistant by id, else by graph, else by name (see ``_FIND_ASSISTANT``)."""
    found = conn.execute(_GET_ASSISTANT, (tenant_id, id_or_name)).fetchone()
    for query in _FIND_ASSISTANT:
        if found is not None:
            break
        found = conn.execute(query, (tenant_id, id_or_name)).fetchone()
    return None if found is None else _read(_ASSISTANT_COLUMNS, found)
