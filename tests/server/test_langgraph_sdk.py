"""The real langgraph-sdk client against a live Nimbus, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import httpx
import pytest
from langgraph_sdk import get_client
from langgraph_sdk.errors import ConflictError, NotFoundError

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import LiveServer, live_server

CALC = {
    "configurable": {
        "model": "openai:fake-model",
        "tools": ["calculator"],
        "instructions": "Use the calculator.",
    }
}


async def test_assistant_thread_streamed_run_state_history(server: LiveServer) -> None:
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(
        graph_id="agent", config=CALC, name="calc", metadata={"team": "math"}
    )
    assert assistant["version"] == 1 and assistant["name"] == "calc"
    thread = await client.threads.create(metadata={"user": "ada"})
    parts = [
        part
        async for part in client.runs.stream(
            thread["thread_id"],
            assistant["assistant_id"],
            input={"messages": [{"role": "user", "content": "What is 6 times 7?"}]},
            stream_mode=["values", "updates", "messages-tuple"],
        )
    ]
    events = [p.event for p in parts]
    assert events[0] == "metadata" and parts[0].data["run_id"]
    assert {"values", "updates", "messages"} <= set(events)
    assert "error" not in events
    tool_updates = [p.data["tools"] for p in parts if p.event == "updates" and "tools" in p.data]
    assert tool_updates[0]["messages"][0]["content"] == "42"
    tokens = "".join(
        p.data[0]["content"]
        for p in parts
        if p.event == "messages" and p.data[0]["type"] == "AIMessageChunk"
    )
    assert tokens == "The result is 42."  # token by token, from the model's stream
    final = [p.data for p in parts if p.event == "values"][-1]
    assert [m["type"] for m in final["messages"]] == ["human", "ai", "tool", "ai"]

    state = await client.threads.get_state(thread["thread_id"])
    messages = state["values"]["messages"]
    assert messages[-1]["content"] == "The result is 42."
    assert messages[1]["tool_calls"][0]["name"] == "calculator"
    assert messages[1]["tool_calls"][0]["args"] == {"expression": "6 * 7"}
    assert messages[2]["tool_call_id"] == messages[1]["tool_calls"][0]["id"]
    assert all(m["id"] for m in messages)
    assert state["checkpoint"]["checkpoint_id"]
    history = await client.threads.get_history(thread["thread_id"], limit=50)
    assert len(history) >= 3
    assert history[0]["checkpoint"]["checkpoint_id"] == state["checkpoint"]["checkpoint_id"]
    assert len(history[-1]["values"]["messages"]) < len(messages)
    thread_after = await client.threads.get(thread["thread_id"])
    assert thread_after["status"] == "idle"
    runs = await client.runs.list(thread["thread_id"])
    assert [r["status"] for r in runs] == ["success"]


async def test_wait_join_and_conversation_continues(server: LiveServer) -> None:
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    thread = await client.threads.create()
    values = await client.runs.wait(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "first"}]},
    )
    assert values["messages"][-1]["content"] == "The result is 42."
    run = await client.runs.create(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "second"}]},
    )
    assert run["status"] in ("pending", "running")  # running: it started as it was queued
    joined = await client.runs.join(thread["thread_id"], run["run_id"])
    human = [m["content"] for m in joined["messages"] if m["type"] == "human"]
    assert human == ["first", "second"]
    fetched = await client.runs.get(thread["thread_id"], run["run_id"])
    assert fetched["status"] == "success"
    stateless = await client.runs.wait(
        None, assistant["assistant_id"], input={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert stateless["messages"][-1]["content"] == "The result is 42."
    streamed = [
        p
        async for p in client.runs.stream(
            None, assistant["assistant_id"], input={"messages": [{"role": "user", "content": "hi"}]}
        )
    ]
    assert streamed[-1].data["messages"][-1]["content"] == "The result is 42."
    # stateless runs leave no thread behind (on_completion="delete", the default)
    assert [t["thread_id"] for t in await client.threads.search(limit=100)] == [thread["thread_id"]]


async def test_assistant_lifecycle(server: LiveServer) -> None:
    client = get_client(url=server.url, api_key=server.admin_key)
    a = await client.assistants.create(
        graph_id="agent",
        assistant_id="11111111-1111-1111-1111-111111111111",
        config=CALC,
        name="first",
        metadata={"k": "v"},
    )
    with pytest.raises(ConflictError):
        await client.assistants.create(graph_id="agent", assistant_id=a["assistant_id"])
    same = await client.assistants.create(
        graph_id="agent", assistant_id=a["assistant_id"], if_exists="do_nothing"
    )
    assert same["name"] == "first"
    b = await client.assistants.update(a["assistant_id"], name="second", metadata={"x": 1})
    assert b["version"] == 2 and b["name"] == "second" and b["metadata"] == {"k": "v", "x": 1}
    versions = await client.assistants.get_versions(a["assistant_id"])
    assert [v["version"] for v in versions] == [2, 1]
    back = await client.assistants.set_latest(a["assistant_id"], 1)
    assert back["name"] == "first" and back["version"] == 1
    found = await client.assistants.search(metadata={"k": "v"})
    assert [f["assistant_id"] for f in found] == [a["assistant_id"]]
    assert await client.assistants.count(graph_id="agent") == 1
    schemas = await client.assistants.get_schemas(a["assistant_id"])
    assert "messages" in schemas["input_schema"]["properties"]
    await client.assistants.delete(a["assistant_id"])
    with pytest.raises(NotFoundError):
        await client.assistants.get(a["assistant_id"])


async def test_threads_and_store(server: LiveServer) -> None:
    client = get_client(url=server.url, api_key=server.admin_key)
    bare = await client.threads.create()
    with pytest.raises(httpx.HTTPStatusError) as refused:  # as LangGraph: no graph yet
        await client.threads.update_state(bare["thread_id"], {"messages": []})
    assert refused.value.response.status_code == 400
    assert "no graph yet" in refused.value.response.text
    t = await client.threads.create(metadata={"user": "ada"}, graph_id="agent")
    await client.threads.update(t["thread_id"], metadata={"topic": "math"})
    got = await client.threads.get(t["thread_id"])
    assert got["metadata"] == {"user": "ada", "graph_id": "agent", "topic": "math"}
    assert got["status"] == "idle"
    assert [x["thread_id"] for x in await client.threads.search(metadata={"user": "ada"})] == [
        t["thread_id"]
    ]
    assert await client.threads.count(metadata={"topic": "math"}) == 1
    update = await client.threads.update_state(
        t["thread_id"], {"messages": [{"role": "user", "content": "note"}]}
    )
    assert update["checkpoint"]["checkpoint_id"]
    state = await client.threads.get_state(t["thread_id"])
    assert state["values"]["messages"][0]["content"] == "note"
    copy = await client.threads.copy(t["thread_id"])
    assert copy["thread_id"] != t["thread_id"]
    copied = await client.threads.get_state(copy["thread_id"])
    assert copied["values"]["messages"][0]["content"] == "note"
    await client.threads.delete(t["thread_id"])
    with pytest.raises(NotFoundError):
        await client.threads.get(t["thread_id"])

    await client.store.put_item(["users", "ada"], "prefs", {"color": "blue", "size": 3})
    await client.store.put_item(["users", "bob"], "prefs", {"color": "red"})
    item = await client.store.get_item(["users", "ada"], "prefs")
    assert item["value"] == {"color": "blue", "size": 3}
    found = await client.store.search_items(["users"], filter={"color": "red"})
    assert [i["namespace"] for i in found["items"]] == [["users", "bob"]]
    ranked = await client.store.search_items(["users"], query="blue")
    assert [i["key"] for i in ranked["items"]] == ["prefs"] and ranked["items"][0]["score"] > 0
    spaces = await client.store.list_namespaces(prefix=["users"], max_depth=1)
    assert spaces["namespaces"] == [["users"]]
    await client.store.delete_item(["users", "ada"], "prefs")
    assert await client.store.get_item(["users", "ada"], "prefs") is None  # as LangGraph


async def test_interrupt_strategy_stops_the_active_run(server: LiveServer) -> None:
    server.fake.latency = 1.0  # the first run is mid model call when the second comes
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    thread = await client.threads.create()
    first = await client.runs.create(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "first"}]},
    )
    await asyncio.sleep(0.3)
    server.fake.latency = 0.0
    second = await client.runs.create(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "second"}]},
        multitask_strategy="interrupt",
    )
    values = await client.runs.join(thread["thread_id"], second["run_id"])
    assert values["messages"][-1]["content"] == "The result is 42."
    stopped = await client.runs.get(thread["thread_id"], first["run_id"])
    assert stopped["status"] == "interrupted"
    finished = await client.runs.get(thread["thread_id"], second["run_id"])
    assert finished["status"] == "success"
    assert (await client.threads.get(thread["thread_id"]))["status"] == "idle"
    # the interrupted run stopped at once: its model call never completed
    human = [m["content"] for m in values["messages"] if m["type"] == "human"]
    assert human == ["first", "second"]
    assert [m["type"] for m in values["messages"]].count("ai") == 2  # the second run's only


async def test_busy_thread_rejects_second_run(server: LiveServer) -> None:
    server.fake.latency = 0.5  # keep the first run busy
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    thread = await client.threads.create()
    first = await client.runs.create(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "x"}]},
    )
    with pytest.raises(ConflictError):
        await client.runs.create(
            thread["thread_id"],
            assistant["assistant_id"],
            input={"messages": [{"role": "user", "content": "y"}]},
            multitask_strategy="reject",
        )
    queued = await client.runs.create(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "y"}]},
        multitask_strategy="enqueue",
    )
    await client.runs.join(thread["thread_id"], first["run_id"])
    values = await client.runs.join(thread["thread_id"], queued["run_id"])
    assert [m["content"] for m in values["messages"] if m["type"] == "human"] == ["x", "y"]


async def test_cancel(server: LiveServer) -> None:
    server.fake.latency = 30
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    thread = await client.threads.create()
    run = await client.runs.create(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "x"}]},
    )
    await client.runs.cancel(thread["thread_id"], run["run_id"], wait=True)
    assert (await client.runs.get(thread["thread_id"], run["run_id"]))["status"] == "interrupted"
    assert (await client.threads.get(thread["thread_id"]))["status"] == "interrupted"
    with pytest.raises(httpx.HTTPStatusError):
        await client.runs.cancel(
            thread["thread_id"], "00000000-0000-0000-0000-000000000000", wait=True
        )


async def test_many_concurrent_runs_all_succeed_with_their_history(server: LiveServer) -> None:
    """Concurrent runs share the step writer's transactions (and SQLite its one connection):
    none fails, none loses a step, each thread's history chains its own checkpoints."""
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    threads = [await client.threads.create() for _ in range(24)]

    async def one(thread_id: str, mode: str) -> None:
        ask = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}
        if mode == "wait":
            values = await client.runs.wait(thread_id, assistant["assistant_id"], input=ask)
            assert isinstance(values, dict)
        else:
            parts = [
                p async for p in client.runs.stream(thread_id, assistant["assistant_id"], input=ask)
            ]
            assert parts[0].event == "metadata" and parts[-1].event == "values"
            values = parts[-1].data
        assert values["messages"][-1]["content"] == "The result is 42."

    await asyncio.gather(
        *(one(t["thread_id"], "wait" if i % 2 else "stream") for i, t in enumerate(threads))
    )
    for thread in threads:
        state = await client.threads.get_state(thread["thread_id"])
        assert [m["type"] for m in state["values"]["messages"]] == ["human", "ai", "tool", "ai"]
        history = await client.threads.get_history(thread["thread_id"], limit=50)
        assert len(history) == 3  # after the model's call, the tool, the final answer
        for newer, older in itertools.pairwise(history):
            assert (
                newer["parent_checkpoint"]["checkpoint_id"] == older["checkpoint"]["checkpoint_id"]
            )
        runs = await client.runs.list(thread["thread_id"])
        assert [r["status"] for r in runs] == ["success"]
        assert (await client.threads.get(thread["thread_id"]))["status"] == "idle"


async def test_quiet_streams_get_heartbeats_that_clients_skip(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}', latency=0.6) as fake,
        live_server(database_url, fake, tmp_path, NIMBUS_SSE_HEARTBEAT_S="0.2") as live,
    ):
        client = get_client(url=live.url, api_key=live.admin_key)
        assistant = await client.assistants.create(graph_id="agent", config=CALC)
        thread = await client.threads.create()
        body = {
            "assistant_id": assistant["assistant_id"],
            "input": {"messages": [{"role": "user", "content": "6*7"}]},
        }
        async with httpx.AsyncClient(
            base_url=live.url, headers={"x-api-key": live.admin_key}, timeout=30
        ) as http:
            raw = await http.post(f"/threads/{thread['thread_id']}/runs/stream", json=body)
        # two model calls of 0.6 s each: several heartbeats while waiting on the model
        assert raw.text.count(": heartbeat\n\n") >= 4
        assert raw.text.startswith("event: metadata")
        parts = [
            p
            async for p in client.runs.stream(
                thread["thread_id"], assistant["assistant_id"], input=body["input"]
            )
        ]
        assert parts[0].event == "metadata"
        assert all(p.event in ("metadata", "values") for p in parts)  # heartbeats skipped
        assert parts[-1].data["messages"][-1]["content"] == "The result is 42."


ASK = {"messages": [{"role": "user", "content": "6 * 7?"}]}


async def test_create_batch_and_state_at_a_checkpoint(server: LiveServer) -> None:
    """``runs.create_batch`` (``POST /runs/batch``) and ``threads.get_state(checkpoint=…)``
    (``POST /threads/{id}/state/checkpoint``): both were 404s."""
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    made = await client.runs.create_batch(
        [{"assistant_id": assistant["assistant_id"], "input": ASK} for _ in range(3)]
    )
    assert len({r["run_id"] for r in made}) == 3
    for run in made:  # real runs: each ends, on a thread of its own
        ended = await client.runs.join(run["thread_id"], run["run_id"])
        assert ended["messages"][-1]["content"] == "The result is 42."
    thread = await client.threads.create()
    await client.runs.wait(thread["thread_id"], assistant["assistant_id"], input=ASK)
    history = await client.threads.get_history(thread["thread_id"])
    first = history[-1]
    at = await client.threads.get_state(
        thread["thread_id"], checkpoint={"checkpoint_id": first["checkpoint"]["checkpoint_id"]}
    )
    assert at["values"] == first["values"] and at["values"] != history[0]["values"]
    with pytest.raises(NotFoundError):
        await client.threads.get_state(thread["thread_id"], checkpoint={"checkpoint_id": "nope"})


async def test_cancel_many(server: LiveServer) -> None:
    """``runs.cancel_many`` (``POST /runs/cancel``): by run ids of a thread, then by status;
    another tenant's runs are never touched."""
    server.fake.latency = 5.0  # the runs stay active while they are cancelled
    client = get_client(url=server.url, api_key=(await _tenant_key(server, "t-cancel")))
    other = get_client(url=server.url, api_key=(await _tenant_key(server, "t-other")))
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    theirs = await other.assistants.create(graph_id="agent", config=CALC)
    thread = await client.threads.create()
    queued = [
        await client.runs.create(
            thread["thread_id"], assistant["assistant_id"], input=ASK, multitask_strategy="enqueue"
        )
        for _ in range(3)
    ]
    untouched = await other.runs.create(None, theirs["assistant_id"], input=ASK)
    await client.runs.cancel_many(
        thread_id=thread["thread_id"], run_ids=[r["run_id"] for r in queued[:2]]
    )
    statuses = [(await client.runs.get(thread["thread_id"], r["run_id"]))["status"] for r in queued]
    assert statuses[:2] == ["interrupted", "interrupted"] and statuses[2] != "interrupted"
    await client.runs.cancel_many(status="all")
    last = await client.runs.get(thread["thread_id"], queued[2]["run_id"])
    assert last["status"] == "interrupted"
    assert (await other.runs.get(untouched["thread_id"], untouched["run_id"]))["status"] in (
        "pending",
        "running",
    )
    async with httpx.AsyncClient(base_url=server.url, headers=_headers(server)) as raw:
        refused = await raw.post("/runs/cancel", json={"thread_id": thread["thread_id"]})
        assert refused.status_code == 422 and "run_ids" in refused.text
    await other.runs.cancel(untouched["thread_id"], untouched["run_id"])


def _headers(server: LiveServer) -> dict[str, str]:
    return {"x-api-key": server.admin_key}


async def _tenant_key(server: LiveServer, tenant: str) -> str:
    async with httpx.AsyncClient(base_url=server.url, headers=_headers(server)) as raw:
        made = await raw.post("/admin/keys", json={"tenant_id": tenant, "scope": "read-write"})
        assert made.status_code == 200, made.text
        return str(made.json()["key"])


async def test_deleting_an_assistant_deletes_its_runs(server: LiveServer) -> None:
    """As LangGraph: the runs of a deleted assistant are gone (an active one is cancelled
    first); another assistant's runs on the same thread stay."""
    client = get_client(url=server.url, api_key=server.admin_key)
    doomed = await client.assistants.create(graph_id="agent", config=CALC)
    kept = await client.assistants.create(graph_id="agent", config=CALC)
    thread = await client.threads.create()
    t = thread["thread_id"]
    done = await client.runs.create(t, doomed["assistant_id"], input=ASK)
    await client.runs.join(t, done["run_id"])
    other = await client.runs.create(t, kept["assistant_id"], input=ASK)
    await client.runs.join(t, other["run_id"])
    server.fake.latency = 5.0
    active = await client.runs.create(t, doomed["assistant_id"], input=ASK)
    await client.assistants.delete(doomed["assistant_id"])
    assert [r["run_id"] for r in await client.runs.list(t)] == [other["run_id"]]
    for gone in (done, active):
        with pytest.raises(NotFoundError):
            await client.runs.get(t, gone["run_id"])
    assert (await client.threads.get(t))["status"] != "busy"  # its cancelled run ended


async def test_the_events_stream_carries_each_step_s_start_and_end(server: LiveServer) -> None:
    """``stream_mode="events"``: besides the model's tokens, the start and end of the graph,
    of each node, of each model call and of each tool call (before: tokens only)."""
    client = get_client(url=server.url, api_key=server.admin_key)
    assistant = await client.assistants.create(graph_id="agent", config=CALC)
    parts = [
        part.data
        async for part in client.runs.stream(
            None, assistant["assistant_id"], input=ASK, stream_mode="events"
        )
        if part.event == "events"
    ]
    seen = [(p["event"], p["name"]) for p in parts if p["event"] != "on_chat_model_stream"]
    assert seen[0] == ("on_chain_start", "LangGraph") and seen[-1] == ("on_chain_end", "LangGraph")
    model = "openai:fake-model"
    assert seen[1:-1] == [
        ("on_chain_start", "agent"),
        ("on_chat_model_start", model),
        ("on_chat_model_end", model),
        ("on_chain_end", "agent"),
        ("on_tool_start", "calculator"),
        ("on_tool_end", "calculator"),
        ("on_chain_start", "agent"),
        ("on_chat_model_start", model),
        ("on_chat_model_end", model),
        ("on_chain_end", "agent"),
    ]
    by_kind = {(p["event"], p["name"]): p for p in parts}
    assert by_kind[("on_tool_start", "calculator")]["data"]["input"] == {"expression": "6 * 7"}
    assert by_kind[("on_tool_end", "calculator")]["data"]["output"]["content"] == "42"
    assert by_kind[("on_chain_start", "LangGraph")]["data"]["input"] == ASK
    final = by_kind[("on_chain_end", "LangGraph")]["data"]["output"]["messages"]
    assert final[-1]["content"] == "The result is 42."
    assert any(p["event"] == "on_chat_model_stream" for p in parts)
    assert by_kind[("on_chat_model_end", model)]["metadata"]["langgraph_node"] == "agent"
