"""The contract of :class:`nimbus.ports.StepSink`: a step stores the run's state, a
checkpoint of its thread and its events; a run's end sets the run's and the thread's
status, alike in memory, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest

from nimbus.exceptions import LeaseLost
from tests.ports.conftest import Backend, step

TENANT = "t1"


async def test_a_step_stores_the_run_state_the_thread_values_and_the_events(
    store: Backend,
) -> None:
    run, _ = await store.claim(await store.new_run())
    written = step(run, 1)
    assert await store.store.steps.write(written) is None  # not an end
    stored = await store.store.runs.get_any(run["run_id"])
    assert stored is not None
    assert (stored["status"], stored["state"]) == ("running", {"step": 1})
    thread = await store.thread_row(TENANT, run["thread_id"])
    assert thread == {
        "status": "busy",
        "values": written.values,
        "checkpoint_id": written.checkpoint_id,
    }
    assert await store.store.runs.last_seq(run["run_id"]) == 3


async def test_a_run_s_end_sets_its_status_and_its_thread_s(store: Backend) -> None:
    run, _ = await store.claim(await store.new_run())
    write, status = await store.end(run)
    assert status == "success"
    assert not write.others_waiting
    stored = await store.store.runs.get_any(run["run_id"])
    assert stored is not None
    assert (stored["status"], stored["error"], stored["state"]) == ("success", None, {"step": 1})
    thread = await store.thread_row(TENANT, run["thread_id"])
    assert thread["status"] == "idle"
    assert thread["values"] == write.values  # the end's values are the thread's
    assert await store.store.runs.events(run["run_id"]) == [
        (2, "values", {"n": 1}),
        (3, "updates", {"n": 1}),
    ]


async def test_a_failed_run_ends_with_its_error(store: Backend) -> None:
    run, _ = await store.claim(await store.new_run())
    write = step(run, 1, values=None, end=("error", "the model failed", "error"))
    assert await store.store.steps.write(write) == "error"
    stored = await store.store.runs.get_any(run["run_id"])
    assert stored is not None and (stored["status"], stored["error"]) == (
        "error",
        "the model failed",
    )
    thread = await store.thread_row(TENANT, run["thread_id"])
    assert (thread["status"], thread["values"], thread["checkpoint_id"]) == ("error", {}, None)


async def test_the_thread_stays_busy_while_another_of_its_runs_waits(store: Backend) -> None:
    first = await store.new_run()
    second = await store.new_run(thread_id=first["thread_id"])
    first, _ = await store.claim(first)
    write, status = await store.end(first)
    assert status == "success"
    assert write.others_waiting is store.tells_others_waiting
    assert (await store.thread_row(TENANT, first["thread_id"]))["status"] == "busy"
    second, _ = await store.claim(second)
    write, _ = await store.end(second)
    assert not write.others_waiting
    assert (await store.thread_row(TENANT, first["thread_id"]))["status"] == "idle"


async def test_a_run_interrupted_meanwhile_stays_interrupted(store: Backend) -> None:
    run, _ = await store.claim(await store.new_run())
    assistant_id = await store.assistant(TENANT)
    newer = await store.queue(TENANT, run["thread_id"], assistant_id, "interrupt")
    assert newer.interrupted == [run["run_id"]]
    write, status = await store.end(run, "success", "idle")
    assert status == "interrupted"
    stored = await store.store.runs.get_any(run["run_id"])
    assert stored is not None
    assert (stored["status"], stored["state"]) == ("interrupted", {"step": 1})
    assert (await store.thread_row(TENANT, run["thread_id"]))["status"] == "busy"
    assert write.others_waiting is store.tells_others_waiting


async def test_submitted_steps_land_in_order(store: Backend) -> None:
    run, _ = await store.claim(await store.new_run())
    futures = [store.store.steps.submit(step(run, n)) for n in (1, 2)]
    futures.append(store.store.steps.submit(step(run, 3, end=("success", None, "idle"))))
    assert [await f for f in futures] == [None, None, "success"]
    stored = await store.store.runs.get_any(run["run_id"])
    assert stored is not None and (stored["status"], stored["state"]) == ("success", {"step": 3})
    assert [e[0] for e in await store.store.runs.events(run["run_id"])] == [2, 3, 4, 5, 6, 7]


async def test_a_write_with_a_stale_lease_token_lands_only_without_leases(
    store: Backend,
) -> None:
    run, _ = await store.claim(await store.new_run())
    stale = step(run, 1, lease_token=run.get("lease_token", 0) + 7)
    if store.leases:
        with pytest.raises(LeaseLost):
            await store.store.steps.write(stale)
        assert await store.store.runs.last_seq(run["run_id"]) == -1
    else:  # one process, no leases: the token is not looked at
        assert await store.store.steps.write(stale) is None
        assert await store.store.runs.last_seq(run["run_id"]) == 3
