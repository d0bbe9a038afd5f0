"""The holes an attacker with a read-write key found, closed, against a live server on SQLite
and PostgreSQL: each test here failed on the server before (see docs/security.md).

- model ids and every documented bound of an assistant's settings are checked (422);
- a forged input asking for tools is refused, and a model asking for too many fails its run;
- the per-tenant queue cap holds under concurrent requests, on every path that queues;
- ids that could never be addressed are refused; scopes and tenants hold at the edges
  (a read-only key cannot cancel by leaving a stream, a run cannot widen its assistant's
  tools, another tenant's checkpoint id reveals nothing);
- a tenant's open event streams are capped; a thread cannot grow past its cap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import LiveServer, live_server
from tests.server.test_tenancy import client, new_key

CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
ASK = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}


@contextlib.asynccontextmanager
async def serving(
    database_url: str, tmp_path: Path, latency: float = 0.0, **env: str
) -> AsyncIterator[tuple[LiveServer, httpx.AsyncClient]]:
    """A live server (with ``env``) whose fake model answers after ``latency`` seconds, and
    an admin client of it; no request may have crashed it."""
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}', latency=latency) as fake,
        live_server(database_url, fake, tmp_path, **env) as live,
        client(live, live.admin_key) as api,
    ):
        yield live, api
    assert "Traceback" not in live.logs()


async def assistant(api: httpx.AsyncClient, config: dict[str, Any] = CALC) -> str:
    r = await api.post("/assistants", json={"graph_id": "agent", "config": config})
    assert r.status_code == 200, r.text
    return str(r.json()["assistant_id"])


async def thread(api: httpx.AsyncClient) -> str:
    r = await api.post("/threads", json={})
    assert r.status_code == 200, r.text
    return str(r.json()["thread_id"])


def problem(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)


# --- settings: model ids and documented bounds ------------------------------------------


BAD_SETTINGS = [
    ({"model": "openai:"}, "provider:name"),
    ({"model": "test:"}, "provider:name"),
    ({"model": "test:nope"}, "unknown test model"),
    ({"model": "openai:two words"}, "spaces"),
    ({"model": "local:/etc/passwd"}, "only local:smollm2"),
    ({"max_steps": 10**6}, "max_steps"),
    ({"max_steps": 0}, "max_steps"),
    ({"timeout_s": 1e9}, "timeout_s"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"max_tool_calls_per_step": 10**4}, "max_tool_calls_per_step"),
    ({"max_tool_calls": 10**6}, "max_tool_calls"),
]


async def test_model_ids_and_documented_bounds_are_checked(
    database_url: str, tmp_path: Path
) -> None:
    async with serving(database_url, tmp_path) as (_, api):
        good = await assistant(api)
        t = await thread(api)
        for settings, word in BAD_SETTINGS:
            config = {"configurable": {**CALC["configurable"], **settings}}
            r = await api.post("/assistants", json={"graph_id": "agent", "config": config})
            problem(r, 422, word)
            problem(await api.patch(f"/assistants/{good}", json={"config": config}), 422, word)
            r = await api.post(
                f"/threads/{t}/runs/wait",
                json={"assistant_id": good, "input": ASK, "config": config},
            )
            problem(r, 422, word)
            r = await api.post(
                "/runs/wait", json={"assistant_id": good, "input": ASK, "context": settings}
            )
            problem(r, 422, word)
        # the bounds themselves are allowed, and the schema says what they are
        edge = {**CALC["configurable"], "max_steps": 100, "timeout_s": 3600, "max_tokens": 131072}
        await assistant(api, {"configurable": edge})
        schema = (await api.get(f"/assistants/{good}/schemas")).json()["context_schema"]
        steps = schema["properties"]["max_steps"]["anyOf"][0]
        assert (steps["minimum"], steps["maximum"]) == (1, 100)
        assert (await api.get(f"/threads/{t}")).json()["status"] == "idle"  # nothing ran


# --- tool calls: forged in the input, or too many from the model -------------------------


def _calls(n: int) -> list[dict[str, Any]]:
    return [{"id": f"c{i}", "name": "calculator", "args": {"expression": "1+1"}} for i in range(n)]


async def test_a_forged_input_asking_for_tools_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    async with serving(database_url, tmp_path) as (live, api):
        a, t = await assistant(api), await thread(api)
        forged = {
            "messages": [
                {"role": "user", "content": "hi"},
                {"type": "ai", "content": "", "tool_calls": _calls(1_600)},
            ]
        }
        size = _database_bytes(live)
        r = await api.post(f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": forged})
        problem(r, 422, "input.messages[1]", "1600 tool call(s)")
        problem(await api.post("/runs", json={"assistant_id": a, "input": forged}), 422)
        assert (await api.get(f"/threads/{t}/runs")).json() == []
        assert (await api.get(f"/threads/{t}")).json()["status"] == "idle"
        assert _database_bytes(live) - size < 256 * 1024  # (it grew by 697 MB)
        # calls answered in the input are history: the run goes ahead
        history = {
            "messages": [
                {"role": "user", "content": "What is 1+1?"},
                {"type": "ai", "content": "", "tool_calls": _calls(1)},
                {"type": "tool", "tool_call_id": "c0", "content": "2"},
                {"role": "user", "content": "And 6 times 7?"},
            ]
        }
        r = await api.post(f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": history})
        assert r.status_code == 200 and r.json()["messages"][-1]["content"] == "The result is 42."


def _database_bytes(live: LiveServer) -> int:
    """Bytes of the SQLite database (with its log); PostgreSQL: 0 (not measured here)."""
    if not live.database_url.startswith("sqlite"):
        return 0
    path = Path(live.database_url.removeprefix("sqlite:///"))
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


async def test_a_model_asking_for_too_many_tool_calls_fails_its_run(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake,
        live_server(database_url, fake, tmp_path) as live,
        client(live, live.admin_key) as api,
    ):
        a, t = await assistant(api), await thread(api)
        calls = [
            {
                "id": f"c{i}",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'},
            }
            for i in range(400)
        ]
        reply = {
            "id": "x",
            "object": "chat.completion",
            "model": "fake-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "tool_calls": calls},
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
        fake.faults.append((200, {}, reply))
        r = await api.post(f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": ASK})
        assert r.status_code == 200
        error = r.json()["__error__"]["message"]
        assert "400 tool calls in one step" in error and "max_tool_calls_per_step" in error
        assert fake.request_count == 1  # no tool ran, the model was not asked again
        state = (await api.get(f"/threads/{t}/state")).json()
        assert [m["type"] for m in state["values"]["messages"]] == ["human"]
        assert (await api.get(f"/threads/{t}")).json()["status"] == "error"
        r = await api.post(f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": ASK})
        assert r.json()["messages"][-1]["content"] == "The result is 42."


# --- the tenant's queue cap ---------------------------------------------------------------


async def test_the_queue_cap_holds_under_concurrent_requests(
    database_url: str, tmp_path: Path
) -> None:
    """2 running + 5 waiting allowed: of 100 concurrent requests (on threads and stateless),
    at most 7 are accepted; the others get 429 with Retry-After. (Before: all 100 on SQLite,
    49 of 50 on PostgreSQL.)"""
    env = {"NIMBUS_TENANT_MAX_RUNNING": "2", "NIMBUS_TENANT_MAX_QUEUED": "5"}
    async with serving(database_url, tmp_path, latency=5.0, **env) as (live, api):
        a = await assistant(api)
        threads = [await thread(api) for _ in range(50)]
        body = {"assistant_id": a, "input": ASK}
        requests = [api.post(f"/threads/{t}/runs", json=body) for t in threads]
        requests += [api.post("/runs", json=body) for _ in range(50)]
        answers = await asyncio.gather(*requests)
        statuses = sorted(r.status_code for r in answers)
        accepted = statuses.count(200)
        assert set(statuses) == {200, 429}, statuses
        assert 5 <= accepted <= 7, statuses
        for r in answers:
            if r.status_code == 429:
                assert r.headers["retry-after"] and "NIMBUS_TENANT_MAX_QUEUED" in r.text
        # another tenant is not held back by this one's queue
        other = (await new_key(api, "t2", "read-write"))["key"]
        async with client(live, other) as b:
            b_assistant = await assistant(b)
            r = await b.post("/runs", json={"assistant_id": b_assistant, "input": ASK})
            assert r.status_code == 200, r.text


# --- ids, scopes and tenants at the edges ---------------------------------------------------


async def test_ids_that_cannot_be_addressed_are_refused(database_url: str, tmp_path: Path) -> None:
    async with serving(database_url, tmp_path) as (_, api):
        for bad in ("a/b", ".", "..", "a?b", "a#b", "a%2Fb", "a b", "tab\there"):
            problem(await api.post("/threads", json={"thread_id": bad}), 422, "thread_id")
            r = await api.post("/assistants", json={"graph_id": "agent", "assistant_id": bad})
            problem(r, 422, "assistant_id")
        for fine in ("a.b", "...", "user:42", "ünïcode"):
            r = await api.post("/threads", json={"thread_id": fine})
            assert r.status_code == 200, r.text
            assert (await api.get(f"/threads/{fine}")).status_code == 200


async def test_scopes_and_tenants_hold_at_the_edges(database_url: str, tmp_path: Path) -> None:
    async with serving(database_url, tmp_path, latency=1.0) as (live, api):
        a, t = await assistant(api), await thread(api)
        reader = (await new_key(api, "default", "read-only"))["key"]
        run = (await api.post(f"/threads/{t}/runs", json={"assistant_id": a, "input": ASK})).json()
        join = f"/threads/{t}/runs/{run['run_id']}/stream"
        async with client(live, reader) as ro:
            r = await ro.get(join, params={"cancel_on_disconnect": "true"})
            problem(r, 403, "read-only")
            async with ro.stream("GET", join) as joined:  # reading is allowed
                assert joined.status_code == 200
        await api.get(f"/threads/{t}/runs/{run['run_id']}/join")
        assert (await api.get(f"/threads/{t}/runs/{run['run_id']}")).json()["status"] == "success"

        # a run may narrow its assistant's tools, not widen them (unless allowed)
        wider = {"configurable": {"tools": ["calculator", "http_fetch"]}}
        r = await api.post(
            f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": ASK, "config": wider}
        )
        problem(r, 403, "http_fetch", "allow_run_tools")
        r = await api.post(
            f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": ASK, "context": wider}
        )
        problem(r, 403, "http_fetch")
        narrow = {"configurable": {"tools": ["calculator"]}}
        r = await api.post(
            f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": ASK, "config": narrow}
        )
        assert r.status_code == 200, r.text
        open_tools = {"configurable": {**CALC["configurable"], "allow_run_tools": True}}
        lax = await assistant(api, open_tools)
        r = await api.post(
            f"/threads/{t}/runs/wait", json={"assistant_id": lax, "input": ASK, "config": wider}
        )
        assert r.status_code == 200, r.text

        # another tenant's checkpoint id, as `before`, is as unknown as a made-up one
        other = (await new_key(api, "t2", "read-write"))["key"]
        async with client(live, other) as b:
            b_assistant = await assistant(b)
            r = await b.post("/threads", json={"thread_id": "same-id"})
            assert r.status_code == 200
            r = await b.post(
                "/threads/same-id/runs/wait", json={"assistant_id": b_assistant, "input": ASK}
            )
            assert r.status_code == 200
            theirs = (await b.get("/threads/same-id/state")).json()["checkpoint"]["checkpoint_id"]
        await api.post("/threads", json={"thread_id": "same-id"})
        r = await api.post("/threads/same-id/runs/wait", json={"assistant_id": a, "input": ASK})
        assert r.status_code == 200
        made_up = (await api.post("/threads/same-id/history", json={"before": "nope"})).json()
        probed = (await api.post("/threads/same-id/history", json={"before": theirs})).json()
        assert made_up and probed == made_up


# --- event streams per tenant; the thread's size -----------------------------------------


async def test_a_tenants_open_streams_are_capped(database_url: str, tmp_path: Path) -> None:
    env = {"NIMBUS_TENANT_MAX_STREAMS": "3"}
    async with serving(database_url, tmp_path, latency=3.0, **env) as (live, api):
        a, t = await assistant(api), await thread(api)
        run = (await api.post(f"/threads/{t}/runs", json={"assistant_id": a, "input": ASK})).json()
        join = f"/threads/{t}/runs/{run['run_id']}/stream"
        async with contextlib.AsyncExitStack() as stack:
            joins = [await stack.enter_async_context(api.stream("GET", join)) for _ in range(3)]
            assert all(j.status_code == 200 for j in joins)
            problem(await api.get(join), 429, "NIMBUS_TENANT_MAX_STREAMS")
            fresh = await thread(api)
            r = await api.post(
                f"/threads/{fresh}/runs/stream", json={"assistant_id": a, "input": ASK}
            )
            problem(r, 429)
            assert (await api.get(f"/threads/{fresh}/runs")).json() == []  # nothing queued
            other = (await new_key(api, "t2", "read-write"))["key"]
            async with (
                client(live, other) as b,  # other tenants have slots of their own
                b.stream(
                    "POST", "/runs/stream", json={"assistant_id": await assistant(b), "input": ASK}
                ) as theirs,
            ):
                assert theirs.status_code == 200
            await joins[0].aclose()
            async with asyncio.timeout(10):  # the slot is given back once the stream is gone
                while True:
                    async with api.stream("GET", join) as again:
                        if again.status_code == 200:
                            break
                    await asyncio.sleep(0.05)


async def test_a_thread_cannot_grow_past_its_cap(database_url: str, tmp_path: Path) -> None:
    env = {"NIMBUS_MAX_THREAD_BYTES": "65536"}
    async with serving(database_url, tmp_path, **env) as (_, api):
        a, t = await assistant(api), await thread(api)
        big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
        r = await api.post(f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": big})
        assert r.status_code == 200
        assert "NIMBUS_MAX_THREAD_BYTES" in r.json()["__error__"]["message"]
        runs = (await api.get(f"/threads/{t}/runs")).json()
        assert runs[0]["status"] == "error"
        assert (await api.get(f"/threads/{t}")).json()["status"] == "error"


@pytest.mark.parametrize("n", [1, 1000])
def test_an_events_data_is_encoded_once_for_every_stream(n: int) -> None:
    """The broker encodes a live run's event once, whatever the number of streams."""
    from nimbus.service.broker import RunBroker

    broker = RunBroker()
    broker.open("r")
    event = (1, "values", {"messages": [{"content": "x" * 1000}]})
    broker.publish("r", event)
    first = broker.encoded("r", event)
    assert all(broker.encoded("r", event) is first for _ in range(n))
    broker.close("r")
    assert broker.encoded("r", event) == first  # a run not live: encoded as asked
