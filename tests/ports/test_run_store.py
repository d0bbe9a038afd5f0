"""The contract of :class:`nimbus.ports.RunStore`: claims, the runs a process resumes, and
the stored events a stream follower reads, alike in memory, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest

from nimbus.exceptions import ThreadBusy
from tests.ports.conftest import Backend, step

TENANT = "t1"


async def test_a_claim_makes_a_pending_run_running_with_one_more_attempt(store: Backend) -> None:
    run = await store.new_run()
    assert (run["status"], run["attempts"]) == ("pending", 0)
    claimed, thread = await store.claim(run)
    assert claimed["run_id"] == run["run_id"]
    assert (claimed["status"], claimed["attempts"]) == ("running", 1)
    assert thread is not None
    assert (thread["thread_id"], thread["values"], thread["checkpoint_id"]) == (
        run["thread_id"],
        {},
        None,
    )
    stored = await store.store.runs.get_any(run["run_id"])
    assert stored is not None and (stored["status"], stored["attempts"]) == ("running", 1)
    assert (await store.thread_row(TENANT, run["thread_id"]))["status"] == "busy"


async def test_a_claim_reads_the_thread_as_the_last_step_left_it(store: Backend) -> None:
    first = await store.new_run()
    first, _ = await store.claim(first)
    written = step(first, 3)
    await store.store.steps.write(written)
    await store.end(first, values=None)  # an end that adds no checkpoint
    second = await store.new_run(thread_id=first["thread_id"])
    _, thread = await store.claim(second)
    assert thread is not None
    assert thread["values"] == written.values
    assert thread["checkpoint_id"] == written.checkpoint_id


async def test_runs_that_ended_or_are_gone_are_not_claimable(store: Backend) -> None:
    done = await store.new_run()
    done, _ = await store.claim(done)
    await store.end(done)
    assert await store.store.runs.claim(done["run_id"], "w") is None
    # a run interrupted by a newer one (multitask "interrupt") before it was claimed
    thread_id = await store.thread(TENANT)
    assistant_id = await store.assistant(TENANT)
    older = (await store.queue(TENANT, thread_id, assistant_id)).run
    newer = await store.queue(TENANT, thread_id, assistant_id, "interrupt")
    assert newer.interrupted == [older["run_id"]]
    assert await store.store.runs.claim(older["run_id"], "w") is None
    assert await store.store.runs.claim("no-such-run", "w") is None
    claimed, _ = await store.claim(newer.run)  # the newer one is
    assert claimed["status"] == "running"


async def test_a_second_run_of_a_thread_waits_for_the_first(store: Backend) -> None:
    first = await store.new_run()
    second = await store.new_run(thread_id=first["thread_id"])
    first, _ = await store.claim(first)
    taken = await store.store.runs.claim(second["run_id"], "w")
    if store.leases:  # the queue keeps a thread's runs one at a time
        assert taken is None
        await store.end(first)
        taken = await store.store.runs.claim(second["run_id"], "w")
    else:  # one process: its scheduler does (a lock per thread), not the claim
        assert taken is not None
    assert taken is not None and taken[0]["attempts"] == 1


async def test_of_a_thread_s_waiting_runs_only_the_oldest_is_claimable_with_leases(
    store: Backend,
) -> None:
    first = await store.new_run()
    second = await store.new_run(thread_id=first["thread_id"])
    taken = await store.store.runs.claim(second["run_id"], "w")
    assert (taken is None) is store.leases
    assert await store.store.runs.claim(first["run_id"], "w") is not None


async def test_a_running_run_is_claimed_again_only_by_a_store_without_leases(
    store: Backend,
) -> None:
    """A one-process store resumes a run left running by a process that stopped (its claim
    takes it again, one more attempt); with leases, a run held is not claimable until the
    sweep hands it back."""
    run = await store.new_run()
    await store.claim(run)
    again = await store.store.runs.claim(run["run_id"], "another-worker")
    if store.leases:
        assert again is None
    else:
        assert again is not None and again[0]["attempts"] == 2


async def test_a_run_queued_on_a_busy_thread_follows_its_multitask_strategy(
    store: Backend,
) -> None:
    """What the seeding of every backend does, as ``Database.runs.create`` does it."""
    thread_id = await store.thread(TENANT)
    assistant_id = await store.assistant(TENANT)
    first = await store.queue(TENANT, thread_id, assistant_id)
    assert (first.run["status"], first.interrupted) == ("pending", [])
    behind = await store.queue(TENANT, thread_id, assistant_id, "enqueue")
    assert (behind.run["status"], behind.interrupted) == ("pending", [])
    with pytest.raises(ThreadBusy):
        await store.queue(TENANT, thread_id, assistant_id, "reject")
    waiting = [r["run_id"] for r in await store.store.runs.unfinished()]
    assert waiting == [first.run["run_id"], behind.run["run_id"]]  # nothing queued
    newest = await store.queue(TENANT, thread_id, assistant_id, "interrupt")
    assert sorted(newest.interrupted) == sorted(waiting)
    for run_id in waiting:
        stored = await store.store.runs.get_any(run_id)
        assert stored is not None and stored["status"] == "interrupted"
    assert [r["run_id"] for r in await store.store.runs.unfinished()] == [newest.run["run_id"]]
    assert (await store.thread_row(TENANT, thread_id))["status"] == "busy"


async def test_unfinished_runs_are_those_pending_or_running_oldest_first(store: Backend) -> None:
    thread_a, thread_b = await store.thread(TENANT), await store.thread("t2")
    first = await store.new_run(thread_id=thread_a)
    second = await store.new_run("t2", thread_id=thread_b)
    third = await store.new_run(thread_id=thread_a)
    ended = await store.new_run()
    await store.claim(second)
    ended, _ = await store.claim(ended)
    await store.end(ended)
    unfinished = await store.store.runs.unfinished()
    assert [(r["run_id"], r["status"]) for r in unfinished] == [
        (first["run_id"], "pending"),
        (second["run_id"], "running"),
        (third["run_id"], "pending"),
    ]


async def test_stored_events_are_read_in_order_after_a_number(store: Backend) -> None:
    run = await store.new_run()
    runs = store.store.runs
    assert (await runs.last_seq(run["run_id"]), await runs.events(run["run_id"])) == (-1, [])
    run, _ = await store.claim(run)
    await store.store.steps.write(step(run, 1))
    await store.store.steps.write(step(run, 2))
    assert await runs.events(run["run_id"]) == [
        (2, "values", {"n": 1}),
        (3, "updates", {"n": 1}),
        (4, "values", {"n": 2}),
        (5, "updates", {"n": 2}),
    ]
    assert await runs.events(run["run_id"], after=3) == [
        (4, "values", {"n": 2}),
        (5, "updates", {"n": 2}),
    ]
    assert await runs.events(run["run_id"], after=5) == []
    assert await runs.last_seq(run["run_id"]) == 5
    other = await store.new_run()
    assert await runs.events(other["run_id"]) == []


async def test_a_run_has_ended_once_its_end_is_written(store: Backend) -> None:
    run = await store.new_run()
    runs = store.store.runs
    assert not await runs.ended(run["run_id"])
    run, _ = await store.claim(run)
    assert not await runs.ended(run["run_id"])
    await store.end(run)
    assert await runs.ended(run["run_id"])
    assert await runs.ended("no-such-run")


async def test_a_run_interrupted_while_held_ends_when_its_worker_writes_its_end(
    store: Backend,
) -> None:
    """With leases a claimed run interrupted from elsewhere is over only once its worker has
    written its end; without, as soon as it is marked interrupted."""
    run = await store.new_run()
    run, _ = await store.claim(run)
    assistant_id = await store.assistant(TENANT)
    await store.queue(TENANT, run["thread_id"], assistant_id, "interrupt")
    assert await store.store.runs.ended(run["run_id"]) is not store.leases
    await store.end(run, "interrupted", "interrupted")
    assert await store.store.runs.ended(run["run_id"])


async def test_get_any_reads_a_run_of_any_tenant(store: Backend) -> None:
    mine, theirs = await store.new_run(), await store.new_run("t2")
    for run in (mine, theirs):
        found = await store.store.runs.get_any(run["run_id"])
        assert found is not None
        assert (found["tenant_id"], found["thread_id"], found["assistant_id"]) == (
            run["tenant_id"],
            run["thread_id"],
            run["assistant_id"],
        )
        assert (found["status"], found["kwargs"], found["multitask_strategy"]) == (
            "pending",
            {"input": None},
            "enqueue",
        )
        assert found["created_at"] == run["created_at"]
    assert await store.store.runs.get_any("no-such-run") is None
