"""Checkpoints stored as what they add, seen through the API: runs (each from the thread
as its claim read it) store their steps as appends, a state update replacing a message stores
a full checkpoint, and every state the API shows (history, state at a checkpoint, the
thread's state, a copy) is the same whole values."""

from __future__ import annotations

import itertools

from langgraph_sdk import get_client
from sqlalchemy import select

from nimbus.adapters.store.database import Database
from nimbus.adapters.store.schema import checkpoints
from tests.server.cluster import agent
from tests.server.conftest import LiveServer

INPUT = {"messages": [{"role": "user", "content": "6*7"}]}


async def _kinds(server: LiveServer, thread_id: str) -> list[str]:
    db = await Database.open(server.database_url, run_migrations=False)
    try:
        async with db.engine.connect() as conn:
            found = await conn.execute(
                select(checkpoints.c.kind)
                .where(checkpoints.c.thread_id == thread_id)
                .order_by(checkpoints.c.created_at)
            )
            return [r[0] for r in found]
    finally:
        await db.close()


async def test_runs_append_and_every_state_reads_whole(server: LiveServer) -> None:
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=agent("calculator"))
    thread_id = (await client.threads.create())["thread_id"]
    for _ in range(2):
        await client.runs.wait(thread_id, assistant["assistant_id"], input=INPUT)
    first_runs = len(await client.threads.get_history(thread_id, limit=100))
    state = await client.threads.get_state(thread_id)
    asked = state["values"]["messages"][0]
    await client.threads.update_state(
        thread_id, {"messages": [{**asked, "content": "what is 6 times 7?"}]}
    )
    await client.runs.wait(thread_id, assistant["assistant_id"], input=INPUT)

    history = await client.threads.get_history(thread_id, limit=100)
    assert len(history) > first_runs + 1
    for h in history:
        checkpoint_id = h["checkpoint"]["checkpoint_id"]
        at = await client.threads.get_state(thread_id, checkpoint_id=checkpoint_id)
        assert at == h
    for newer, older in itertools.pairwise(history):
        assert newer["parent_checkpoint"] == older["checkpoint"]
    current = await client.threads.get_state(thread_id)
    assert current["values"] == history[0]["values"]
    assert current["values"]["messages"][0]["content"] == "what is 6 times 7?"
    oldest_first = history[::-1]
    assert oldest_first[first_runs]["metadata"]["source"] == "update"
    after = len(history) - first_runs - 1
    kinds = await _kinds(server, thread_id)
    assert kinds == ["full", *["append"] * (first_runs - 1), "full", *["append"] * after]

    copy = await client.threads.copy(thread_id)
    copied = await client.threads.get_history(copy["thread_id"], limit=100)
    assert [h["values"] for h in copied] == [h["values"] for h in history]
