"""Group commit of run steps, on SQLite and on PostgreSQL: every step lands, concurrent steps
share transactions, a bad step fails alone, and a run's end respects a cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from nimbus.adapters.store.database import Database
from nimbus.records import StepWrite
from tests.store.conftest import new_assistant

TENANT = "t1"


async def _queued_run(db: Database) -> dict[str, Any]:
    thread, _ = await db.threads.create(TENANT, thread_id=None, metadata={})
    queued = await db.runs.create(
        TENANT,
        thread_id=thread["thread_id"],
        assistant_id=await new_assistant(db, TENANT),
        kwargs={},
        metadata={},
        multitask_strategy="enqueue",
    )
    assert queued is not None
    run = queued.run
    return {"run_id": run["run_id"], "thread_id": thread["thread_id"]}


async def _claim(db: Database, run: dict[str, Any]) -> None:
    """Claim ``run`` (a lease on PostgreSQL): its steps then carry the lease's token."""
    claimed = await db.runs.claim(run["run_id"], "test-worker")
    assert claimed is not None
    run["lease_token"] = claimed[0]["lease_token"]


def _step(run: dict[str, Any], n: int, **changes: object) -> StepWrite:
    write = StepWrite(
        TENANT,
        run["run_id"],
        run["thread_id"],
        orjson.Fragment(orjson.dumps({"step": n})),
        values={"messages": [{"type": "human", "content": f"step {n}", "id": str(n)}]},
        step=n,
        next_nodes=["agent"],
        lease_token=run.get("lease_token", 0),
        events=[(n, "values", {"n": n}), (n + 100, "messages", [{"n": n}, {"meta": True}])],
    )
    for key, value in changes.items():
        setattr(write, key, value)
    return write


async def test_concurrent_steps_all_land_in_shared_transactions(db: Database) -> None:
    runs = [await _queued_run(db) for _ in range(12)]
    before = db.steps.batches
    await asyncio.gather(*(db.steps.write(_step(run, 1)) for run in runs))
    assert db.steps.batches - before < len(runs)  # several steps per transaction
    for run in runs:
        thread = await db.threads.get(TENANT, run["thread_id"])
        assert thread is not None
        assert thread["values"]["messages"][0]["content"] == "step 1"
        history = await db.threads.history(TENANT, run["thread_id"])
        assert [h["checkpoint_id"] for h in history] == [thread["checkpoint_id"]]
        assert history[0]["next"] == ["agent"]
        stored = await db.runs.get(TENANT, run["run_id"])
        assert stored is not None and stored["state"] == {"step": 1}
        events = await db.runs.events(run["run_id"])
        assert events == [(1, "values", {"n": 1}), (101, "messages", [{"n": 1}, {"meta": True}])]


async def test_a_bad_step_fails_alone(db: Database) -> None:
    good, bad = await _queued_run(db), await _queued_run(db)
    await db.steps.write(_step(bad, 1))
    # the same event numbers again break the unique (run, seq) index: only for that run
    results = await asyncio.gather(
        db.steps.write(_step(good, 1)), db.steps.write(_step(bad, 1)), return_exceptions=True
    )
    assert results[0] is None
    assert isinstance(results[1], Exception)
    assert len(await db.runs.events(good["run_id"])) == 2
    assert len(await db.runs.events(bad["run_id"])) == 2  # nothing half-written


async def test_the_end_of_a_cancelled_run_keeps_it_interrupted(db: Database) -> None:
    run = await _queued_run(db)
    await _claim(db, run)
    await db.runs.cancel(TENANT, run["run_id"], None, "interrupt")
    final = await db.steps.write(_step(run, 2, end=("success", None, "idle")))
    assert final == "interrupted"
    stored = await db.runs.get(TENANT, run["run_id"])
    assert stored is not None
    assert stored["status"] == "interrupted" and stored["state"] == {"step": 2}
    thread = await db.threads.get(TENANT, run["thread_id"])
    assert thread is not None and thread["status"] == "idle"


async def test_the_end_of_a_run_leaves_its_thread_busy_while_another_waits(
    db: Database,
) -> None:
    run = await _queued_run(db)
    queued = await db.runs.create(
        TENANT,
        thread_id=run["thread_id"],
        assistant_id=(await db.runs.get(TENANT, run["run_id"]) or {})["assistant_id"],
        kwargs={},
        metadata={},
        multitask_strategy="enqueue",
    )
    assert queued is not None  # waiting behind the run
    await _claim(db, run)
    final = await db.steps.write(_step(run, 1, end=("error", "boom", "error")))
    assert final == "error"
    thread = await db.threads.get(TENANT, run["thread_id"])
    assert thread is not None and thread["status"] == "busy"
    stored = await db.runs.get(TENANT, run["run_id"])
    assert stored is not None and (stored["status"], stored["error"]) == ("error", "boom")


async def test_steps_of_one_run_in_one_batch_land_in_order(db: Database) -> None:
    """With durability "async" a run's next step can be queued before the last one landed:
    in one batch, the run keeps the last state and end, the thread the last values, and
    every step its checkpoint and events."""
    run = await _queued_run(db)
    await _claim(db, run)
    before = db.steps.batches
    # a model call's step and its tool's step share a step number: the history keeps them
    # in order all the same
    steps = [
        _step(run, 1),
        _step(run, 2, step=1),
        _step(run, 3, values=None, end=("success", None, "idle")),
    ]
    results = await asyncio.gather(*(db.steps.submit(step) for step in steps))
    assert results == [None, None, "success"]
    assert db.steps.batches - before == 1  # one transaction for the three
    stored = await db.runs.get(TENANT, run["run_id"])
    assert stored is not None
    assert (stored["status"], stored["state"]) == ("success", {"step": 3})
    thread = await db.threads.get(TENANT, run["thread_id"])
    assert thread is not None and thread["status"] == "idle"
    assert thread["values"]["messages"][0]["content"] == "step 2"
    assert thread["checkpoint_id"] == steps[1].checkpoint_id
    history = await db.threads.history(TENANT, run["thread_id"])
    assert [h["checkpoint_id"] for h in history] == [s.checkpoint_id for s in steps[1::-1]]
    assert [e[0] for e in await db.runs.events(run["run_id"])] == [1, 2, 3, 101, 102, 103]
