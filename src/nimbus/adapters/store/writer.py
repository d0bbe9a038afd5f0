"""Group commit of run steps: the step writes of every run in flight go to the database in
shared transactions, a few statements each whatever the number of runs.

A run's step write is its state, a checkpoint of its thread, the thread's new values (and,
at the end, status) and the run's new events. One writer task takes whatever writes are
waiting, writes them all at once (PostgreSQL: one statement; SQLite: one transaction of an
``executemany`` per table) and then answers each caller. Under load a batch carries many
runs' steps; alone, a step is written at once. A batch that fails is retried one write at a
time, so one bad write fails only its own run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store.common import now
from nimbus.adapters.store.engine import unavailable
from nimbus.adapters.store.postgres_runs import PostgresRuns
from nimbus.adapters.store.sqlite_runs import SqliteRuns
from nimbus.exceptions import LeaseLost
from nimbus.records import StepWrite, dump_json
from nimbus.service import checkpoints

log = structlog.get_logger("nimbus.adapters.store")
MAX_BATCH = 256
DEADLOCK_RETRIES = 3
LOST = "lease lost"  #: a write refused: the writer's lease token is no longer the run's


_Item = tuple[StepWrite, "asyncio.Future[str | None]"]


class StepWriter:
    """The single writer task of a process (see the module's docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        pg_runs: PostgresRuns | None = None,
        sqlite_runs: SqliteRuns | None = None,
    ) -> None:
        self.engine = engine
        self.pg_runs = pg_runs
        self.sqlite_runs = sqlite_runs
        #: how long a batch is retried while the database is unreachable (a worker sets its
        #: lease time: past it the run is another worker's, and the write would be refused)
        self.outage_s = 0.0
        self.batches = 0  #: transactions written (each holds one or more steps)
        self.steps = 0  #: steps written
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def write(self, step: StepWrite) -> str | None:
        """Write ``step`` durably; for a run's end, returns its final status (``interrupted``
        when it was cancelled meanwhile)."""
        return await asyncio.shield(self.submit(step))  # a cancelled caller's write still lands

    def submit(self, step: StepWrite) -> asyncio.Future[str | None]:
        """Queue ``step`` for writing; the future is done once it is durable (or failed).

        Writes are done in the order they were submitted: when a write's future is done,
        so are the futures of every write submitted before it."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="nimbus-step-writer")
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((step, future))
        return future

    async def close(self) -> None:
        """Finish the writes queued so far, then stop the writer task."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    await self._flush(batch)
                    return
                batch.append(item)
            await self._flush(batch)

    async def _flush(self, batch: list[_Item]) -> None:
        steps = [step for step, _ in batch]
        try:
            results = await self._write(steps)
        except Exception as exc:
            if len(batch) > 1 and not unavailable(exc):  # find the bad write: each alone
                for one in batch:
                    await self._flush([one])
                return
            for step, future in batch:
                log.warning("store.step_write_failed", run_id=step.run_id, error=str(exc))
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.steps += len(batch)
        for (step, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if result is LOST:
                future.set_exception(LeaseLost(step.run_id, step.lease_token))
            else:
                future.set_result(result)

    async def _write(self, steps: list[StepWrite]) -> list[str | None]:
        deadlocks, pause = 0, 0.05
        deadline = time.monotonic() + self.outage_s
        while True:
            try:
                if self.pg_runs is not None:
                    return await write_steps_pg(self.pg_runs.pool, steps)
                assert self.sqlite_runs is not None, "a database is PostgreSQL or SQLite"
                return await self.sqlite_runs.write_steps(steps)
            except asyncpg.DeadlockDetectedError:
                # a run being queued on a thread (interrupt) locks the thread, then its runs;
                # this locks runs, then threads: PostgreSQL aborts one, try again
                deadlocks += 1
                if deadlocks > DEADLOCK_RETRIES:
                    raise
            except Exception as exc:
                if not unavailable(exc) or time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)  # the database is away: wait for it, a while
                pause = min(pause * 2, 2.0)


# PostgreSQL: a batch is one statement (atomic on its own: no BEGIN/COMMIT round trips), its
# rows passed as arrays (JSON as text: asyncpg would read a list inside an array as a nested
# dimension). Data-modifying CTEs all see the snapshot taken before the statement.
_PG_STEPS = """
WITH s AS (
    SELECT u.run_id, u.thread_id, u.tenant_id, u.state::json AS state, u.vals,
           u.checkpoint_id, u.parent_id, u.step, u.next::json AS next, u.end_status,
           u.end_error, u.end_thread_status, u.ord, u.adds, u.origin_id, u.hops
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::int[], $9::text[], $10::text[], $11::text[], $12::text[], $19::bigint[],
        $20::text[], $21::text[], $22::int[]
    ) WITH ORDINALITY AS u(run_id, thread_id, tenant_id, state, vals, checkpoint_id, parent_id,
           step, next, end_status, end_error, end_thread_status, token, adds, origin_id, hops,
           ord)
    -- fencing: only the holder of the run's current lease writes; the lock keeps a sweep or
    -- a claim from changing the token before this statement is done
    JOIN runs r ON r.run_id = u.run_id AND r.lease_token = u.token
    FOR UPDATE OF r
),
-- A batch may hold several steps of one run (durability "async"): every step's checkpoint
-- and events are stored, the run takes the last step's state and end, the thread the last
-- step's values.
l AS (SELECT DISTINCT ON (run_id) * FROM s ORDER BY run_id, ord DESC),
lv AS (
    SELECT DISTINCT ON (run_id) run_id, vals, checkpoint_id FROM s
    WHERE vals IS NOT NULL ORDER BY run_id, ord DESC
),
t AS (
    UPDATE threads SET
        "values" = COALESCE(lv.vals::jsonb, threads."values"),
        checkpoint_id = CASE WHEN lv.vals IS NULL THEN threads.checkpoint_id
                             ELSE lv.checkpoint_id END,
        status = CASE
            WHEN l.end_thread_status IS NULL THEN threads.status
            WHEN EXISTS (
                SELECT 1 FROM runs o
                WHERE o.tenant_id = l.tenant_id AND o.thread_id = l.thread_id
                AND o.run_id <> l.run_id AND o.status IN ('pending', 'running')
            ) THEN 'busy'
            ELSE l.end_thread_status END,
        updated_at = $13
    FROM l LEFT JOIN lv ON lv.run_id = l.run_id
    WHERE threads.tenant_id = l.tenant_id AND threads.thread_id = l.thread_id
    RETURNING threads.tenant_id, threads.thread_id, threads.status
),
-- A checkpoint is stored as the messages it appends to its parent's (adds) or whole, by the
-- rule of nimbus.service.checkpoints.stored_kind: seq is its origin's (stored before this
-- statement) plus its hops; its parent is stored already or in this batch; $23 is
-- SNAPSHOT_EVERY.
k AS (
    SELECT s.*, q.seq,
           CASE WHEN s.adds IS NOT NULL AND q.seq % $23 <> 0
                     AND (s.parent_id IN (SELECT b.checkpoint_id FROM s b WHERE b.vals IS NOT NULL)
                          OR EXISTS (SELECT 1 FROM checkpoints p
                                     WHERE p.checkpoint_id = s.parent_id))
                THEN 'append' ELSE 'full' END AS kind
    FROM s CROSS JOIN LATERAL (
        SELECT coalesce((SELECT o.seq FROM checkpoints o WHERE o.checkpoint_id = s.origin_id),
                        -1) + s.hops AS seq
    ) q
    WHERE s.vals IS NOT NULL
),
c AS (
    INSERT INTO checkpoints (checkpoint_id, tenant_id, thread_id, parent_id, run_id, step,
                             kind, seq, "values", metadata, next, created_at)
    SELECT k.checkpoint_id, k.tenant_id, k.thread_id, k.parent_id, k.run_id, k.step,
           k.kind, k.seq, (CASE WHEN k.kind = 'append' THEN k.adds ELSE k.vals END)::json,
           jsonb_build_object('run_id', k.run_id, 'step', k.step, 'source', 'loop'), k.next,
           $13 + k.ord * interval '1 microsecond'  -- the history's order, within a batch too
    FROM k
),
e AS (
    INSERT INTO run_events (run_id, tenant_id, seq, event, data)
    SELECT v.run_id, v.tenant_id, v.seq, v.event, v.data::json
    FROM unnest($14::text[], $15::text[], $16::int[], $17::text[], $18::text[])
        AS v(run_id, tenant_id, seq, event, data)
    WHERE v.run_id IN (SELECT run_id FROM s)
)
UPDATE runs SET
    status = CASE WHEN l.end_status IS NULL OR runs.status = 'interrupted' THEN runs.status
                  ELSE l.end_status END,
    error = CASE WHEN l.end_status IS NULL OR runs.status = 'interrupted' THEN runs.error
                 ELSE l.end_error END,
    state = l.state,
    updated_at = $13,
    -- the run's end gives its lease up
    lease_owner = CASE WHEN l.end_status IS NULL THEN runs.lease_owner END
FROM l LEFT JOIN t ON t.tenant_id = l.tenant_id AND t.thread_id = l.thread_id
WHERE runs.run_id = l.run_id
RETURNING runs.run_id, runs.status, t.status AS thread_status
"""


async def write_steps_pg(pg: asyncpg.Pool, steps: list[StepWrite]) -> list[str | None]:
    """Write ``steps`` in one statement (atomic on its own). A step whose lease token is no
    longer its run's is not written: its result is :data:`LOST`."""
    given, steps = steps, sorted(steps, key=lambda s: (s.tenant_id, s.thread_id))  # lock order
    ends = [s.end or (None, None, None) for s in steps]
    events = [(s, e) for s in steps for e in s.events]
    rows = await pg.fetch(
        _PG_STEPS,
        [s.run_id for s in steps],
        [s.thread_id for s in steps],
        [s.tenant_id for s in steps],
        [dump_json(s.state) for s in steps],
        [None if s.values is None else dump_json(s.values) for s in steps],
        [s.checkpoint_id for s in steps],
        [s.parent_id for s in steps],
        [s.step for s in steps],
        [dump_json(s.next_nodes) for s in steps],
        [e[0] for e in ends],
        [e[1] for e in ends],
        [e[2] for e in ends],
        now(),
        [s.run_id for s, _ in events],
        [s.tenant_id for s, _ in events],
        [e[0] for _, e in events],
        [e[1] for _, e in events],
        [dump_json(e[2]) for _, e in events],
        [s.lease_token for s in steps],
        [None if s.appended is None else dump_json({"messages": s.appended}) for s in steps],
        [s.origin_id for s in steps],
        [s.hops for s in steps],
        checkpoints.SNAPSHOT_EVERY,
    )
    status = {r["run_id"]: r["status"] for r in rows}
    busy = {r["run_id"] for r in rows if r["thread_status"] == "busy"}
    for s in given:
        s.others_waiting = s.end is not None and s.run_id in busy
    return [
        LOST if s.run_id not in status else status[s.run_id] if s.end is not None else None
        for s in given
    ]
