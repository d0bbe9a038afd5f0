"""Workers' liveness locks on PostgreSQL: a worker whose lock is free is dead (its runs are
swept at once), one that holds its lock keeps its runs until its heartbeat expires, a sweeper
never sweeps itself, and a sweeper trusts free locks only once its own lock has been held on
one connection for the restart guard's grace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from nimbus.adapters.store import liveness
from nimbus.adapters.store.database import Database
from nimbus.adapters.store.liveness import LivenessLock
from nimbus.adapters.store.postgres_runs import PostgresRuns, sweep_dead, take_liveness_lock
from tests.store.conftest import new_assistant


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """Advisory locks are PostgreSQL's: the ``db`` of these tests is PostgreSQL alone."""
    return postgres_url


def _fast(db: Database) -> PostgresRuns:
    assert db.pg_runs is not None
    return db.pg_runs


@pytest.fixture
async def connect(db: Database) -> AsyncIterator[Callable[[], Any]]:
    """Opens connections of their own (as a worker's lock connection), closed at the end."""
    opened: list[asyncpg.Connection] = []

    async def open_one() -> asyncpg.Connection:
        conn = await _fast(db).connect()
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        await conn.close()


async def _held_run(db: Database, worker: str) -> str:
    """A run claimed by ``worker``, whose heartbeat is alive for 30 s."""
    await _fast(db).heartbeat(worker, 30)
    thread, _ = await db.threads.create("t1", thread_id=None, metadata={})
    queued = await db.runs.create(
        "t1",
        thread_id=thread["thread_id"],
        assistant_id=await new_assistant(db, "t1"),
        kwargs={},
        metadata={},
        multitask_strategy="enqueue",
    )
    assert queued is not None
    run = queued.run
    assert await db.runs.claim(run["run_id"], worker) is not None
    return str(run["run_id"])


async def test_a_worker_whose_lock_is_free_is_dead(
    db: Database, connect: Callable[[], Any]
) -> None:
    sweeper, w2 = await connect(), await connect()
    assert await take_liveness_lock(sweeper, "s")
    assert await take_liveness_lock(w2, "w2")
    assert not await take_liveness_lock(await connect(), "w2")  # one session holds it
    r1, r2 = await _held_run(db, "w1"), await _held_run(db, "w2")
    # w1 never took its lock (as if it died): dead, but only to a sweeper that trusts locks
    assert await sweep_dead(sweeper, "s", trust_locks=False) == []
    assert await sweep_dead(sweeper, "s", trust_locks=True) == [(r1, "pending")]
    await w2.close()  # w2's process dies: its connection ends, and its lock is free at once
    assert await sweep_dead(sweeper, "s", trust_locks=True) == [(r2, "pending")]
    assert await take_liveness_lock(await connect(), "w2")  # the sweep released it


async def test_a_stalled_worker_keeps_its_runs_until_its_heartbeat_expires(
    db: Database, connect: Callable[[], Any]
) -> None:
    sweeper, stalled = await connect(), await connect()
    assert await take_liveness_lock(sweeper, "s")
    assert await take_liveness_lock(stalled, "w1")
    run_id = await _held_run(db, "w1")
    assert await sweep_dead(sweeper, "s", trust_locks=True) == []  # its lock is held
    async with _fast(db).pool.acquire() as conn:  # it stalls past its lease
        await conn.execute(
            "UPDATE workers SET expires_at = now() - interval '1 second' WHERE worker_id = 'w1'"
        )
    assert await sweep_dead(sweeper, "s", trust_locks=False) == [(run_id, "pending")]


async def test_a_sweeper_never_sweeps_its_own_runs(
    db: Database, connect: Callable[[], Any]
) -> None:
    """Its session holds its lock, and would take it again: it is excluded."""
    sweeper = await connect()
    assert await take_liveness_lock(sweeper, "s")
    await _held_run(db, "s")
    assert await sweep_dead(sweeper, "s", trust_locks=True) == []


async def _lock_pid(db: Database) -> int | None:
    """The backend holding an advisory lock in this database, if any."""
    async with _fast(db).pool.acquire() as conn:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    return None if pid is None else int(pid)


async def _released(db: Database) -> bool:
    return await _lock_pid(db) is None


async def _until(condition: Callable[[], Any], limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_the_restart_guard(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweeper whose lock connection is new (the database restarted, or the sweeper just
    started) trusts no free lock until its own has been held for the grace: live workers
    that have not yet taken theirs again keep their runs meanwhile."""
    monkeypatch.setattr(liveness, "RESTART_GRACE_S", 1.0)
    lock = LivenessLock(_fast(db), "s")

    async def trusted() -> bool:
        return lock.trusted

    async def retaken() -> bool:
        now = await _lock_pid(db)
        return lock.held and now is not None and now != pid

    await lock.start()
    try:
        first = await _held_run(db, "w1")  # w1 lives (heartbeat) but holds no lock yet
        started = time.monotonic()
        assert await lock.sweep() == []
        assert not lock.trusted
        await _until(trusted)
        assert time.monotonic() - started >= 0.9
        assert await lock.sweep() == [(first, "pending")]

        # The lock's connection ends (as at a restart): the lock is taken again on a new
        # connection, and the grace starts over.
        pid = await _lock_pid(db)
        assert pid is not None and lock.held
        async with _fast(db).pool.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        second = await _held_run(db, "w1")
        await _until(retaken)
        retaken = time.monotonic()
        assert lock.held and not lock.trusted
        assert await lock.sweep() == []
        await _until(trusted)
        assert time.monotonic() - retaken >= 0.9
        assert await lock.sweep() == [(second, "pending")]
    finally:
        await lock.close()
    # closed: given up (the server releases it once it has seen the terminated session end)
    await _until(lambda: _released(db))
