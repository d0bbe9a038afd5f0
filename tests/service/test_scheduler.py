"""The scheduler of a one-process store (:class:`LocalScheduler`, as :func:`worker_pool`
picks it for a store without a shared queue), run in process on a :class:`MemoryStore`: fair
across tenants, capped per tenant, a thread's runs one at a time, every run ended, and what
a stop leaves resumed by the next start."""

from __future__ import annotations

from nimbus.core.messages import AssistantMessage
from nimbus.service.scheduler import LocalScheduler
from tests.service.conftest import Harness


async def test_the_pool_of_a_store_without_a_shared_queue_is_the_local_scheduler(
    harness: Harness,
) -> None:
    assert isinstance(await harness.pool(), LocalScheduler)


async def test_a_tenants_backlog_does_not_hold_back_another_tenant(harness: Harness) -> None:
    pool = await harness.pool(concurrency=1)
    runs = [harness.submit(pool, "A", name) for name in ("a1", "a2", "a3", "a4")]
    runs.append(harness.submit(pool, "B", "b1"))  # queued last, behind all of A's
    for count in range(1, 6):
        started = await harness.script.wait_started(count)
        harness.script.release(started[-1])  # one run at a time: the pool has one slot
    # the tenants take turns: B's run comes next after the run A had started by then
    assert harness.script.started == ["a1", "a2", "b1", "a3", "a4"]
    for run_id in runs:
        outcome = await harness.finished(run_id)
        assert outcome is not None and outcome[0] == "success"


async def test_a_tenant_runs_at_most_its_cap_at_once(harness: Harness) -> None:
    pool = await harness.pool(concurrency=4, tenant_max_running=1)
    a1, a2 = harness.submit(pool, "A", "a1"), harness.submit(pool, "A", "a2")
    b1 = harness.submit(pool, "B", "b1")
    assert sorted(await harness.script.wait_started(2)) == ["a1", "b1"]
    harness.script.release("b1")
    await harness.finished(b1)  # a free slot, but A is at its cap: a2 still waits
    assert harness.script.started == ["a1", "b1"]
    assert await harness.status(a2) == ("pending", 0)
    harness.script.release("a1")
    assert (await harness.script.wait_started(3))[-1] == "a2"
    harness.script.release("a2")
    for run_id in (a1, a2):
        outcome = await harness.finished(run_id)
        assert outcome is not None and outcome[0] == "success"
    assert harness.script.most_running == 2


async def test_runs_of_one_thread_run_one_at_a_time_in_queue_order(harness: Harness) -> None:
    pool = await harness.pool(concurrency=4)
    thread_id = harness.store.add_thread("A")
    runs = [harness.submit(pool, "A", name, thread_id) for name in ("t1", "t2", "t3")]
    harness.script.release("other")
    other = harness.submit(pool, "A", "other")  # another thread's run: not held back
    await harness.finished(other)
    assert sorted(harness.script.started) == ["other", "t1"]  # t2 and t3 wait for t1
    for name in ("t1", "t2"):
        harness.script.release(name)
        started = await harness.script.wait_started(len(harness.script.started) + 1)
        assert started[-1] == f"t{int(name[1]) + 1}"
    harness.script.release("t3")
    for run_id in runs:
        outcome = await harness.finished(run_id)
        assert outcome is not None and outcome[0] == "success"
    # each run read the thread as the one before left it
    assert AssistantMessage("answer to t2") in harness.script.seen["t3"]
    assert AssistantMessage("answer to t1") in harness.script.seen["t3"]
    thread = harness.store.thread("A", thread_id)
    assert thread is not None and thread.status == "idle"
    assert [m["content"] for m in thread.values["messages"]] == [
        "t1",
        "answer to t1",
        "t2",
        "answer to t2",
        "t3",
        "answer to t3",
    ]


async def test_a_cancelled_run_ends_interrupted(harness: Harness) -> None:
    pool = await harness.pool()
    run_id = harness.submit(pool, "A", "slow")
    await harness.script.wait_started(1)
    assert pool.cancel(run_id)
    await harness.finished(run_id)
    assert await harness.status(run_id) == ("interrupted", 1)
    run = await harness.store.runs.get_any(run_id)
    assert run is not None
    thread = harness.store.thread("A", run["thread_id"])
    assert thread is not None and thread.status == "interrupted"
    assert [m["content"] for m in thread.values["messages"]] == ["slow"]  # its input is kept
    assert not pool.cancel(run_id)  # not running any more


async def test_a_run_whose_model_raises_ends_in_error_and_the_next_one_runs(
    harness: Harness,
) -> None:
    pool = await harness.pool()
    harness.script.failing.add("boom")
    harness.script.release("boom", "after")
    thread_id = harness.store.add_thread("A")
    broken = harness.submit(pool, "A", "boom", thread_id)
    after = harness.submit(pool, "A", "after", thread_id)
    outcome = await harness.finished(broken)
    assert outcome is not None and outcome[0] == "error"
    assert outcome[1] is not None and "internal error" in outcome[1]
    run = await harness.store.runs.get_any(broken)
    assert run is not None and (run["status"], run["error"]) == ("error", outcome[1])
    assert [e[1] for e in await harness.store.runs.events(broken)][-1] == "error"
    outcome = await harness.finished(after)  # the thread's queue goes on
    assert outcome is not None and outcome[0] == "success"
    thread = harness.store.thread("A", thread_id)
    assert thread is not None and thread.status == "idle"


async def test_start_resumes_the_runs_left_unfinished(harness: Harness) -> None:
    waiting = harness.queue("A", "waiting").run["run_id"]
    cut_off = harness.queue("B", "cut off").run["run_id"]
    # claimed by a process that stopped before the run's end
    assert await harness.store.runs.claim(cut_off, "a process gone") is not None
    harness.script.release("waiting", "cut off")
    await harness.pool()
    for run_id in (waiting, cut_off):
        outcome = await harness.finished(run_id)
        assert outcome is not None and outcome[0] == "success"
    assert await harness.status(waiting) == ("success", 1)
    assert await harness.status(cut_off) == ("success", 2)
    assert sorted(harness.script.started) == ["cut off", "waiting"]


async def test_stop_lets_the_running_run_finish_and_leaves_queued_runs_pending(
    harness: Harness,
) -> None:
    pool = await harness.pool(concurrency=1)
    running = harness.submit(pool, "A", "running")
    queued = harness.submit(pool, "A", "queued")
    await harness.script.wait_started(1)
    harness.script.release("running", "queued")
    await pool.stop(grace_s=5)  # within the grace: the running run finishes
    assert await harness.status(running) == ("success", 1)
    assert await harness.status(queued) == ("pending", 0)
    assert harness.script.started == ["running"]
    assert [r["run_id"] for r in await harness.store.runs.unfinished()] == [queued]


async def test_a_run_cut_off_by_a_stop_is_resumed_by_the_next_start(harness: Harness) -> None:
    pool = await harness.pool()
    run_id = harness.submit(pool, "A", "long")
    await harness.script.wait_started(1)
    await pool.stop(grace_s=0)  # no grace: cancelled, but not ended
    assert await harness.status(run_id) == ("running", 1)
    await harness.pool()
    await harness.script.wait_started(2)
    harness.script.release("long")
    outcome = await harness.finished(run_id)
    assert outcome is not None and outcome[0] == "success"
    assert await harness.status(run_id) == ("success", 2)
