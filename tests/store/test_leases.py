"""The shared run queue on PostgreSQL: claims are leases with fencing tokens, runs of a thread
go one at a time, workers claiming at once take different runs, tenants take turns, expired
leases go back to the queue, and a worker that lost its lease can no longer write."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from nimbus.adapters.store.database import Database
from nimbus.adapters.store.engine import MIGRATIONS
from nimbus.adapters.store.postgres_runs import PostgresRuns
from nimbus.exceptions import LeaseLost
from nimbus.records import StepWrite
from tests.store.conftest import new_assistant


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """The shared queue is PostgreSQL's: the ``db`` of these tests is PostgreSQL alone."""
    return postgres_url


def _fast(db: Database) -> PostgresRuns:
    assert db.pg_runs is not None
    return db.pg_runs


async def _queue(db: Database, tenant: str, thread_id: str | None = None) -> dict[str, Any]:
    if thread_id is None:
        thread, _ = await db.threads.create(tenant, thread_id=None, metadata={})
        thread_id = thread["thread_id"]
    queued = await db.runs.create(
        tenant,
        thread_id=thread_id,
        assistant_id=await new_assistant(db, tenant),
        kwargs={},
        metadata={},
        multitask_strategy="enqueue",
    )
    assert queued is not None
    run = queued.run
    return run


def _step(run: dict[str, Any], token: int, n: int, **changes: Any) -> StepWrite:
    write = StepWrite(
        run["tenant_id"],
        run["run_id"],
        run["thread_id"],
        orjson.Fragment(orjson.dumps({"step": n})),
        values={"messages": [{"type": "human", "content": f"step {n}", "id": str(n)}]},
        step=n,
        events=[(n, "values", {"n": n})],
        lease_token=token,
    )
    for key, value in changes.items():
        setattr(write, key, value)
    return write


async def _alive(db: Database, *workers: str) -> None:
    for worker in workers:
        await _fast(db).heartbeat(worker, 30)


async def _expire(db: Database, worker: str) -> None:
    """Make a worker's heartbeat look old, as if it had stopped renewing it long ago."""
    async with _fast(db).pool.acquire() as conn:
        await conn.execute(
            "UPDATE workers SET expires_at = now() - interval '1 second' WHERE worker_id = $1",
            worker,
        )


async def test_a_claim_is_a_lease_with_a_new_token(db: Database) -> None:
    await _alive(db, "w1", "w2")
    run = await _queue(db, "t1")
    claimed = await db.runs.claim(run["run_id"], "w1")
    assert claimed is not None
    row, thread = claimed
    assert row["status"] == "running" and row["lease_owner"] == "w1"
    assert row["lease_token"] == 1 and row["attempts"] == 1
    assert thread is not None and thread["thread_id"] == run["thread_id"]
    assert await db.runs.claim(run["run_id"], "w2") is None  # held: not claimable


async def test_a_stale_token_writes_nothing(db: Database) -> None:
    await _alive(db, "w1", "w2")
    run = await _queue(db, "t1")
    first = await db.runs.claim(run["run_id"], "w1")
    assert first is not None
    await db.steps.write(_step(run, first[0]["lease_token"], 1))
    assert await _fast(db).sweep() == []  # w1 is alive: nothing to sweep
    await _expire(db, "w1")
    assert await _fast(db).sweep() == [(run["run_id"], "pending")]
    second = await db.runs.claim(run["run_id"], "w2")
    assert second is not None
    assert second[0]["lease_token"] > first[0]["lease_token"]
    assert second[0]["attempts"] == 2 and second[0]["state"] == {"step": 1}

    with pytest.raises(LeaseLost):  # the first worker wakes up and tries to go on
        await db.steps.write(_step(run, first[0]["lease_token"], 2))
    with pytest.raises(LeaseLost):
        await db.steps.write(_step(run, first[0]["lease_token"], 2, end=("success", None, "idle")))
    stored = await db.runs.get("t1", run["run_id"])
    assert stored is not None and stored["state"] == {"step": 1}
    assert stored["status"] == "running" and stored["lease_owner"] == "w2"
    assert [seq for seq, _, _ in await db.runs.events(run["run_id"])] == [1]
    thread = await db.threads.get("t1", run["thread_id"])
    assert thread is not None and thread["values"]["messages"][0]["content"] == "step 1"

    # the new holder writes, and its end frees the lease
    final = await db.steps.write(
        _step(run, second[0]["lease_token"], 2, end=("success", None, "idle"))
    )
    assert final == "success"
    stored = await db.runs.get("t1", run["run_id"])
    assert stored is not None and stored["lease_owner"] is None


async def test_only_the_oldest_run_of_a_thread_is_claimable(db: Database) -> None:
    first = await _queue(db, "t1")
    second = await _queue(db, "t1", first["thread_id"])
    assert await db.runs.claim(second["run_id"], "w1") is None  # the older one goes first
    claimed = await _fast(db).claim_next("w1", 10, 1 << 30)
    assert [r["run_id"] for r, _ in claimed] == [first["run_id"]]
    assert await _fast(db).claim_next("w2", 10, 1 << 30) == []  # the thread is busy
    token = claimed[0][0]["lease_token"]
    await db.steps.write(
        _step(first, token, 1, end=("success", None, "idle"), others_waiting=False)
    )
    after = await _fast(db).claim_next("w2", 10, 1 << 30)
    assert [r["run_id"] for r, _ in after] == [second["run_id"]]


async def test_the_end_of_a_run_says_when_its_thread_has_more_waiting(db: Database) -> None:
    first = await _queue(db, "t1")
    await _queue(db, "t1", first["thread_id"])
    claimed = await db.runs.claim(first["run_id"], "w1")
    assert claimed is not None
    end = _step(first, claimed[0]["lease_token"], 1, end=("success", None, "idle"))
    await db.steps.write(end)
    assert end.others_waiting


async def test_workers_claiming_at_once_take_different_runs(db: Database) -> None:
    runs = [await _queue(db, "t1") for _ in range(30)]
    fast = _fast(db)
    batches = await asyncio.gather(*(fast.claim_next(f"w{i}", 4, 1 << 30) for i in range(8)))
    taken = [r["run_id"] for batch in batches for r, _ in batch]
    assert len(taken) == len(set(taken))  # nobody got a run twice
    assert len(taken) <= 30 and set(taken) <= {r["run_id"] for r in runs}
    rest = await fast.claim_next("w9", 100, 1 << 30)
    assert len(taken) + len(rest) == 30


async def test_tenants_take_turns_and_each_has_a_cap(db: Database) -> None:
    noisy = [await _queue(db, "noisy") for _ in range(6)]
    quiet = [await _queue(db, "quiet") for _ in range(2)]
    fast = _fast(db)
    first = await fast.claim_next("w1", 4, 1 << 30)
    tenants = [r["tenant_id"] for r, _ in first]
    assert sorted(tenants) == ["noisy", "noisy", "quiet", "quiet"]  # not the 4 oldest (noisy)
    capped = await fast.claim_next("w1", 10, 3)  # noisy may have 3 running: 1 more
    assert [r["tenant_id"] for r, _ in capped] == ["noisy"]
    assert await fast.pending("noisy") == 3 and await fast.pending() == 3
    assert len(noisy) + len(quiet) == 8


async def test_a_worker_learns_of_lost_and_cancelled_runs(db: Database) -> None:
    await _alive(db, "w1")
    a, b = await _queue(db, "t1"), await _queue(db, "t1")
    ca = await db.runs.claim(a["run_id"], "w1")
    cb = await db.runs.claim(b["run_id"], "w1")
    assert ca is not None and cb is not None
    await db.runs.cancel("t1", b["run_id"], None, "interrupt")
    held = {a["run_id"]: ca[0]["lease_token"], b["run_id"]: cb[0]["lease_token"]}
    assert await _fast(db).held("w1", held) == {a["run_id"]: "running", b["run_id"]: "interrupted"}
    await _expire(db, "w1")  # w1 stalled past its lease
    await _fast(db).sweep()
    await _alive(db, "w1")  # and came back: its runs are not its own any more
    assert await _fast(db).held("w1", held) == {}


async def test_a_run_that_just_ended_is_not_lost(db: Database) -> None:
    await _alive(db, "w1")
    run = await _queue(db, "t1")
    claimed = await db.runs.claim(run["run_id"], "w1")
    assert claimed is not None
    token = claimed[0]["lease_token"]
    await db.steps.write(_step(run, token, 1, end=("success", None, "idle")))
    # the check raced with the end: the run is not lost, it is over
    assert await _fast(db).held("w1", {run["run_id"]: token}) == {run["run_id"]: "ended"}


async def test_an_interrupted_run_of_a_dead_worker_ends_and_frees_its_thread(
    db: Database,
) -> None:
    await _alive(db, "w1")
    run = await _queue(db, "t1")
    assert await db.runs.claim(run["run_id"], "w1") is not None
    await db.runs.cancel("t1", run["run_id"], None, "interrupt")
    await _expire(db, "w1")  # the worker died before it wrote the end
    assert await _fast(db).sweep() == [(run["run_id"], "interrupted")]
    thread = await db.threads.get("t1", run["thread_id"])
    assert thread is not None and thread["status"] == "interrupted"


async def test_a_worker_hands_its_runs_back(db: Database) -> None:
    await _alive(db, "w1", "w2")
    run = await _queue(db, "t1")
    claimed = await db.runs.claim(run["run_id"], "w1")
    assert claimed is not None
    lease = {run["run_id"]: claimed[0]["lease_token"]}
    assert await _fast(db).hand_back("w2", lease) == []  # not w2's
    assert await _fast(db).hand_back("w1", {run["run_id"]: 0}) == []  # an older lease
    assert await _fast(db).hand_back("w1", lease) == [run["run_id"]]
    again = await _fast(db).claim_next("w2", 10, 1 << 30)
    assert [(r["run_id"], r["attempts"]) for r, _ in again] == [(run["run_id"], 2)]


async def test_a_concurrent_sweep_and_write_never_both_win(db: Database) -> None:
    """The step write locks the run's row: a sweep waits for it, or the write sees the new
    token; never a checkpoint from a worker whose lease was already taken."""
    for i in range(20):
        await _alive(db, f"w{i}")
        run = await _queue(db, "t1")
        claimed = await db.runs.claim(run["run_id"], f"w{i}")
        assert claimed is not None
        await _expire(db, f"w{i}")
        write, swept = await asyncio.gather(
            db.steps.write(_step(run, claimed[0]["lease_token"], 1)),
            _fast(db).sweep(),
            return_exceptions=True,
        )
        assert swept == [(run["run_id"], "pending")]
        stored = await db.runs.get("t1", run["run_id"])
        assert stored is not None
        checkpoints = await db.threads.history("t1", run["thread_id"], limit=10)
        if isinstance(write, LeaseLost):  # swept first: nothing of the write landed
            assert stored["state"] is None and checkpoints == []
        else:  # written first, then swept: the next worker resumes from it
            assert write is None and stored["state"] == {"step": 1} and len(checkpoints) == 1


def _head() -> str | None:
    """The newest migration."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


async def test_migrations_of_processes_starting_together(postgres_url: str) -> None:
    """Several processes migrating one new database at once: one does it, none fails."""
    dbs = await asyncio.gather(*(Database.open(postgres_url) for _ in range(4)))
    for one in dbs:
        await one.close()
    conn = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == _head()
    finally:
        await conn.close()
