"""Queueing a run, on SQLite and on PostgreSQL: a run that may start at once is claimed as it
is queued when a worker slot was reserved for it (``claim_as``), and only then."""

from __future__ import annotations

from typing import Any

import orjson

from nimbus.adapters.store.database import Database
from nimbus.exceptions import ThreadBusy
from nimbus.records import Queued, StepWrite
from tests.store.conftest import new_assistant

TENANT = "t1"


async def _thread_and_assistant(db: Database) -> tuple[str, str]:
    thread, _ = await db.threads.create(TENANT, thread_id=None, metadata={})
    return thread["thread_id"], await new_assistant(db, TENANT)


async def _queue(
    db: Database, thread_id: str, assistant_id: str, strategy: str, claim_as: str | None
) -> Queued:
    queued = await db.runs.create(
        TENANT,
        thread_id=thread_id,
        assistant_id=assistant_id,
        kwargs={"input": {"n": 1}},
        metadata={"m": 1},
        multitask_strategy=strategy,
        claim_as=claim_as,
    )
    assert queued is not None
    return queued


async def test_a_run_that_may_start_is_claimed_as_it_is_queued(db: Database) -> None:
    thread_id, assistant_id = await _thread_and_assistant(db)
    queued = await _queue(db, thread_id, assistant_id, "enqueue", "worker-1")
    first = queued.run
    assert first["status"] == "running" and first["attempts"] == 1
    assert queued.claimed and queued.thread is not None
    assert queued.thread["thread_id"] == thread_id
    assert queued.thread["values"] == {}
    stored = await db.runs.get(TENANT, first["run_id"])
    assert stored is not None
    assert (stored["status"], stored["attempts"], stored["kwargs"], stored["metadata"]) == (
        "running",
        1,
        {"input": {"n": 1}},
        {"m": 1},
    )
    assert stored["created_at"] == first["created_at"]
    assert [a["attempt"] for a in await db.runs.attempts(TENANT, first["run_id"])] == [1]
    if db.pg_runs is not None:  # a lease: its steps write with its token
        assert (stored["lease_owner"], stored["lease_token"]) == ("worker-1", 1)
    thread = await db.threads.get(TENANT, thread_id)
    assert thread is not None and thread["status"] == "busy"
    step = StepWrite(
        TENANT,
        first["run_id"],
        thread_id,
        orjson.Fragment(b'{"step": 1}'),
        values={"messages": []},
        step=1,
        lease_token=first["lease_token"],
    )
    assert await db.steps.write(step) is None  # landed: not refused as a lost lease

    # the thread is busy now: the next run waits its turn, claimed by nobody
    second = await _queue(db, thread_id, assistant_id, "enqueue", "worker-1")
    assert second.run["status"] == "pending" and not second.claimed
    stored = await db.runs.get(TENANT, second.run["run_id"])
    assert stored is not None and (stored["status"], stored["attempts"]) == ("pending", 0)
    assert await db.runs.attempts(TENANT, second.run["run_id"]) == []


async def test_a_run_interrupting_another_is_not_claimed_as_it_is_queued(db: Database) -> None:
    thread_id, assistant_id = await _thread_and_assistant(db)
    first = (await _queue(db, thread_id, assistant_id, "enqueue", "worker-1")).run
    queued = await _queue(db, thread_id, assistant_id, "interrupt", "worker-1")
    newer = queued.run
    assert queued.interrupted == [first["run_id"]]
    assert newer["status"] == "pending"  # the interrupted run still holds the thread
    stored = await db.runs.get(TENANT, first["run_id"])
    assert stored is not None and stored["status"] == "interrupted"


async def test_without_a_reserved_slot_a_run_is_only_queued(db: Database) -> None:
    thread_id, assistant_id = await _thread_and_assistant(db)
    queued = await _queue(db, thread_id, assistant_id, "reject", None)
    run = queued.run
    assert run["status"] == "pending" and not queued.claimed and queued.thread is None
    stored = await db.runs.get(TENANT, run["run_id"])
    assert stored is not None and (stored["status"], stored["attempts"]) == ("pending", 0)


async def _queue_with_assistant(
    db: Database, tenant: str, thread_id: str, assistant_id: str, claim_as: str | None = None
) -> Queued | None:
    return await db.runs.create_with_assistant(
        tenant,
        thread_id=thread_id,
        assistant_id=assistant_id,
        kwargs={"input": {"n": 1}},
        metadata={},
        multitask_strategy="enqueue",
        claim_as=claim_as,
    )


async def test_the_assistant_is_read_as_the_run_is_queued(db: Database) -> None:
    thread_id, assistant_id = await _thread_and_assistant(db)
    queued = await _queue_with_assistant(db, TENANT, thread_id, assistant_id, "worker-1")
    assert queued is not None
    run, assistant = queued.run, queued.assistant
    assert "assistant" not in run and run["status"] == "running"
    assert queued.claimed and queued.thread is not None
    assert queued.thread["thread_id"] == thread_id
    # the row as the assistant store reads it, JSON columns parsed, timestamps aware
    assert assistant == await db.assistants.get(TENANT, assistant_id)
    stored = await db.runs.get(TENANT, run["run_id"])
    assert stored is not None and stored["assistant_id"] == assistant_id
    second = await _queue_with_assistant(db, TENANT, thread_id, assistant_id)
    assert second is not None and second.run["status"] == "pending"  # the first still runs


async def _named(db: Database, tenant: str, name: str) -> dict[str, Any]:
    assistant, _ = await db.assistants.create(
        tenant,
        assistant_id=None,
        graph_id="agent",
        name=name,
        description=None,
        config={"configurable": {"name": name}},
        context={},
        metadata={},
        if_exists="raise",
    )
    return assistant


async def test_the_assistant_may_be_named_by_graph_or_by_name(db: Database) -> None:
    thread, _ = await db.threads.create(TENANT, thread_id=None, metadata={})
    first = await _named(db, TENANT, "helper")  # the first made from the graph "agent"
    newest = await _named(db, TENANT, "helper")  # the newest named "helper"
    other = await _named(db, TENANT, "other")
    await _named(db, "t2", "theirs")
    for name, meant in (("agent", first), ("helper", newest), (other["assistant_id"], other)):
        assert await db.assistants.find(TENANT, name) == meant  # as the general path reads it
        queued = await _queue_with_assistant(db, TENANT, thread["thread_id"], name)
        assert queued is not None
        run, assistant = queued.run, queued.assistant
        assert assistant == meant
        assert run["assistant_id"] == meant["assistant_id"]
        stored = await db.runs.get(TENANT, run["run_id"])
        assert stored is not None and stored["assistant_id"] == meant["assistant_id"]
    # another tenant's assistant, by name, is no assistant of this tenant: nothing is queued
    assert await db.assistants.find(TENANT, "theirs") is None
    assert await db.assistants.find("t2", "theirs") is not None
    assert await _queue_with_assistant(db, TENANT, thread["thread_id"], "theirs") is None
    assert len(await db.runs.of_thread(TENANT, thread["thread_id"])) == 3


async def test_nothing_is_queued_without_the_assistant_or_the_thread(db: Database) -> None:
    thread_id, assistant_id = await _thread_and_assistant(db)
    # no such assistant; another tenant's assistant; another tenant's thread; no such thread
    other_assistant = await new_assistant(db, "t2")
    other_thread, _ = await db.threads.create("t2", thread_id=None, metadata={})
    for tenant, thread, assistant in (
        (TENANT, thread_id, "no-such-assistant"),
        (TENANT, thread_id, other_assistant),
        (TENANT, other_thread["thread_id"], assistant_id),
        (TENANT, "no-such-thread", assistant_id),
    ):
        assert await _queue_with_assistant(db, tenant, thread, assistant, "worker-1") is None
    assert await db.runs.of_thread(TENANT, thread_id) == []
    assert await db.runs.of_thread("t2", other_thread["thread_id"]) == []
    thread = await db.threads.get(TENANT, thread_id)
    assert thread is not None and thread["status"] == "idle"


async def _general(
    db: Database,
    thread_id: str | None,
    assistant_id: str,
    strategy: str = "enqueue",
    claim_as: str | None = "worker-1",
    key: tuple[str, str] | None = ("key-1", "hash-1"),
    if_not_exists: str = "reject",
) -> Queued | None:
    """A run that takes the general path: an Idempotency-Key, or a thread to make."""
    return await db.runs.create(
        TENANT,
        thread_id=thread_id,
        assistant_id=assistant_id,
        kwargs={"input": {"n": 2}},
        metadata={"m": 2},
        multitask_strategy=strategy,
        idempotency=key,
        if_not_exists=if_not_exists,
        temporary=thread_id is None,
        claim_as=claim_as,
    )


async def test_the_general_path_queues_by_the_same_rule(db: Database) -> None:
    """The general path (a key, a thread to make) queues through the same statement as the
    usual run: claimed at once when it may start, refused or interrupting as the strategy
    says, and replayed, not queued again, for the same key."""
    thread_id, assistant_id = await _thread_and_assistant(db)
    first = await _general(db, thread_id, assistant_id)
    assert first is not None and first.claimed and first.thread is not None
    assert first.thread["thread_id"] == thread_id and first.run["status"] == "running"
    again = await _general(db, thread_id, assistant_id)
    assert again is not None and again.replayed and again.run["run_id"] == first.run["run_id"]
    busy = None
    try:
        await _general(db, thread_id, assistant_id, "reject", key=("key-2", "hash-2"))
    except ThreadBusy as exc:
        busy = exc
    assert busy is not None
    newer = await _general(db, thread_id, assistant_id, "interrupt", key=("key-3", "hash-3"))
    assert newer is not None and newer.interrupted == [first.run["run_id"]]
    assert not newer.claimed and newer.run["status"] == "pending"
    stored = await db.runs.get(TENANT, first.run["run_id"])
    assert stored is not None and stored["status"] == "interrupted"
    assert await db.runs.attempts(TENANT, newer.run["run_id"]) == []


async def test_a_thread_made_by_the_general_path_starts_its_run_at_once(db: Database) -> None:
    _, assistant_id = await _thread_and_assistant(db)
    cases = ((None, ("key-4", "hash-4"), "reject"), ("made-here", None, "create"))
    for thread_id, key, if_not_exists in cases:
        queued = await _general(db, thread_id, assistant_id, key=key, if_not_exists=if_not_exists)
        assert queued is not None and queued.claimed and queued.thread is not None
        made = await db.threads.get(TENANT, queued.run["thread_id"])
        assert made is not None and made["status"] == "busy"
        assert [a["attempt"] for a in await db.runs.attempts(TENANT, queued.run["run_id"])] == [1]
    missing = await _general(db, "never-made", assistant_id, key=None)
    assert missing is None
