"""``nimbus bench checkpoints``: what a thread's checkpoints cost as the thread grows.

One run on one thread of a fresh database writes ``steps`` steps through the step writer, one
at a time, as a run of the server does: each step appends one tool result (``message_bytes``
of text) to the thread's messages, its checkpoint placed by a
:class:`~nimbus.service.checkpoints.CheckpointChain`. At steps 10, 100, 1,000 (…): how much the
database grew since the thread was made, the bytes of the checkpoints table and of its
``values`` column, and the time of a step's write. At the end, the median time of the reads a
client makes there: the thread's state (``GET /threads/{id}/state``), the state at its newest
checkpoint and at the one with the most appends to apply (``GET …/state/{checkpoint}``), and a
page of 10 of its history at the top and in the middle (``before``).

``snapshot_every=1`` stores every checkpoint whole, as before checkpoints were stored as what
they add: the same rows, but for the two small columns ``kind`` and ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text

from nimbus.adapters.store.database import Database
from nimbus.bench.processes import fresh_postgres_database
from nimbus.records import StepWrite
from nimbus.service import checkpoints
from nimbus.service.checkpoints import CheckpointChain

TENANT = "bench"
HISTORY_PAGE = 10
# Tool results read like text, which compresses (PostgreSQL compresses a large value).
_WORDS = (
    "the", "result", "of", "query", "lists", "rows", "with", "values", "for", "each", "key",
    "and", "a", "total", "items", "found", "in", "table", "where", "status", "is", "open",
    "or", "closed", "by", "date", "name", "amount", "account", "region", "error", "ok",
    "true", "false", "none", "id", "user", "order", "product", "price", "count", "average",
)  # fmt: skip


@dataclass
class Mark:
    """Figures once ``steps`` steps are written."""

    steps: int
    db_bytes: int  #: database growth since the thread was made
    checkpoints_bytes: int | None  #: the checkpoints table with its indexes (and TOAST)
    values_bytes: int  #: the checkpoints' ``values`` column
    write_ms: float  #: mean time of a step's write since the mark before

    @property
    def db_bytes_per_step(self) -> float:
        return self.db_bytes / self.steps


@dataclass
class CheckpointsResult:
    """One thread of ``steps`` checkpoints on one database."""

    database: str
    snapshot_every: int
    message_bytes: int
    marks: list[Mark] = field(default_factory=list)
    #: median ms of each read at the last step: state, state_at_newest, state_at_worst,
    #: history, history_middle
    reads_ms: dict[str, float] = field(default_factory=dict)


def _message(n: int, size: int) -> dict[str, Any]:
    """A tool result of about ``size`` bytes of text, in LangGraph shape."""
    rng = random.Random(n)
    words: list[str] = []
    length = 0
    while length < size:
        words.append(rng.choice(_WORDS))
        length += len(words[-1]) + 1
    return {
        "type": "tool",
        "content": " ".join(words),
        "id": f"run-bench-{n}",
        "tool_call_id": f"call-{n}",
        "name": "query",
        "status": "success",
        "additional_kwargs": {},
        "response_metadata": {},
    }


async def _size(db: Database) -> tuple[int, int | None, int]:
    """(database bytes in use, checkpoints table and indexes, values column bytes)."""
    async with db.engine.connect() as conn:
        if db.engine.dialect.name == "sqlite":
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
            free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one()
            page = (await conn.exec_driver_sql("PRAGMA page_size")).scalar_one()
            table = (
                await conn.exec_driver_sql(
                    "SELECT sum(pgsize) FROM dbstat WHERE name IN "
                    "(SELECT name FROM sqlite_schema WHERE tbl_name = 'checkpoints')"
                )
            ).scalar()
            values = 'length(CAST("values" AS BLOB))'
            used = (pages - free) * page
        else:
            used = (
                await conn.execute(text("SELECT pg_database_size(current_database())"))
            ).scalar_one()
            table = (
                await conn.execute(text("SELECT pg_total_relation_size('checkpoints')"))
            ).scalar_one()
            values = 'octet_length("values"::text)'
        stored = (await conn.execute(text(f"SELECT sum({values}) FROM checkpoints"))).scalar()
    return int(used), None if table is None else int(table), int(stored or 0)


async def _median_ms(read: Callable[[], Awaitable[object]], times: int) -> float:
    await read()  # warm
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        await read()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


@contextlib.contextmanager
def _snapshot_every(k: int | None) -> Iterator[None]:
    """Store a full checkpoint every ``k`` (the store's own rule otherwise)."""
    kept = checkpoints.SNAPSHOT_EVERY
    checkpoints.SNAPSHOT_EVERY = k or kept
    try:
        yield
    finally:
        checkpoints.SNAPSHOT_EVERY = kept


@contextlib.contextmanager
def _database_url(kind: str, postgres_url: str) -> Iterator[str]:
    """A fresh database: an SQLite file, or a new database on ``postgres_url``'s server."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as workdir:
            yield f"sqlite:///{Path(workdir) / 'nimbus.db'}"
        return
    with fresh_postgres_database(postgres_url) as (url, _):
        yield url


def bench_checkpoints(
    *,
    database: str,
    postgres_url: str,
    steps: int = 1000,
    message_bytes: int = 500,
    snapshot_every: int | None = None,
    reads: int = 30,
    report: Callable[[Mark], None] | None = None,
) -> CheckpointsResult:
    """Write one thread of ``steps`` checkpoints and measure it (see the module's docstring)."""
    with _snapshot_every(snapshot_every), _database_url(database, postgres_url) as url:
        result = CheckpointsResult(database, checkpoints.SNAPSHOT_EVERY, message_bytes)
        asyncio.run(_bench(url, result, steps, reads, report))
        return result


async def _bench(
    url: str,
    result: CheckpointsResult,
    steps: int,
    reads: int,
    report: Callable[[Mark], None] | None,
) -> None:
    db = await Database.open(url)
    try:
        thread_id = await _write_thread(db, result, steps, report)
        result.reads_ms = await _reads(db, thread_id, reads)
    finally:
        await db.close()


async def _write_thread(
    db: Database, result: CheckpointsResult, steps: int, report: Callable[[Mark], None] | None
) -> str:
    """Write the thread (see the module's docstring); its id."""
    assistant, _ = await db.assistants.create(
        TENANT,
        assistant_id=None,
        graph_id="agent",
        name="bench",
        description=None,
        config={},
        context={},
        metadata={},
        if_exists="raise",
    )
    thread, _ = await db.threads.create(TENANT, thread_id=None, metadata={})
    queued = await db.runs.create(
        TENANT,
        thread_id=thread["thread_id"],
        assistant_id=assistant["assistant_id"],
        kwargs={},
        metadata={},
        multitask_strategy="enqueue",
    )
    assert queued is not None
    run = queued.run
    claimed = await db.runs.claim(run["run_id"], "bench-worker")
    assert claimed is not None
    token = claimed[0].get("lease_token") or 0
    start, _, _ = await _size(db)
    chain = CheckpointChain(None, None)
    messages: list[dict[str, Any]] = [
        {"type": "human", "content": "Look these up.", "id": "human-0"},
    ]
    marks = {10**e for e in range(1, 8) if 10**e <= steps} | {steps}
    spent, since = 0.0, 0
    for step in range(1, steps + 1):
        messages.append(_message(step, result.message_bytes))
        started = time.perf_counter()
        write = StepWrite(
            TENANT,
            run["run_id"],
            thread["thread_id"],
            orjson.Fragment(b'{"step": %d}' % step),
            step=step,
            lease_token=token,
            next_nodes=["tools"],
        )
        chain.extend(write, {"messages": list(messages)})
        await db.steps.write(write)
        spent += time.perf_counter() - started
        if step in marks:
            used, table, values = await _size(db)
            mark = Mark(step, used - start, table, values, spent * 1000 / (step - since))
            result.marks.append(mark)
            if report is not None:
                report(mark)
            spent, since = 0.0, step
    return str(thread["thread_id"])


async def _reads(db: Database, thread_id: str, times: int) -> dict[str, float]:
    thread = await db.threads.get(TENANT, thread_id)
    assert thread is not None
    newest = thread["checkpoint_id"]
    async with db.engine.connect() as conn:
        # the checkpoint with the most appends to apply: the newest one before a full one
        worst = (
            await conn.execute(
                text(
                    "SELECT checkpoint_id FROM checkpoints WHERE thread_id = :t "
                    "AND seq % :k = :k - 1 ORDER BY created_at DESC LIMIT 1"
                ),
                {"t": thread_id, "k": checkpoints.SNAPSHOT_EVERY},
            )
        ).scalar()
        middle = (
            await conn.execute(
                text(
                    "SELECT checkpoint_id FROM checkpoints WHERE thread_id = :t "
                    "ORDER BY created_at LIMIT 1 OFFSET "
                    "(SELECT count(*) / 2 FROM checkpoints WHERE thread_id = :t)"
                ),
                {"t": thread_id},
            )
        ).scalar_one()

    async def state() -> None:  # as GET /threads/{id}/state reads it
        found = await db.threads.get(TENANT, thread_id)
        assert found is not None
        await db.threads.checkpoint(TENANT, thread_id, found["checkpoint_id"], values=False)

    async def state_at(checkpoint_id: str) -> None:
        await db.threads.checkpoint(TENANT, thread_id, checkpoint_id)

    return {
        "state": await _median_ms(state, times),
        "state_at_newest": await _median_ms(lambda: state_at(newest), times),
        "state_at_worst": await _median_ms(lambda: state_at(worst or newest), times),
        "history": await _median_ms(
            lambda: db.threads.history(TENANT, thread_id, limit=HISTORY_PAGE), times
        ),
        "history_middle": await _median_ms(
            lambda: db.threads.history(TENANT, thread_id, limit=HISTORY_PAGE, before=middle),
            times,
        ),
    }


def as_json(result: CheckpointsResult) -> bytes:
    """The figures as JSON."""
    out = asdict(result)
    for mark, data in zip(result.marks, out["marks"], strict=True):
        data["db_bytes_per_step"] = mark.db_bytes_per_step
    return orjson.dumps(out, option=orjson.OPT_INDENT_2)
