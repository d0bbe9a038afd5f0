"""Bad input against a live server, on SQLite and PostgreSQL: every mistake is a 4xx whose
JSON body says what is wrong, the same on both databases, and never a 500. Plus clients
that misbehave on a stream: they neither block the server nor lose the run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import LiveServer, live_server

LIMIT = 4096  # NIMBUS_MAX_BODY_BYTES of the server under test
CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
ASK = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}


@pytest.fixture
async def small(database_url: str, tmp_path: Path) -> AsyncIterator[LiveServer]:
    """A live server with a small body limit."""
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake,
        live_server(database_url, fake, tmp_path, NIMBUS_MAX_BODY_BYTES=str(LIMIT)) as live,
    ):
        yield live
    assert "Traceback" not in live.logs()  # no request crashed the server anywhere


@pytest.fixture
async def api(small: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """An admin client of the small server."""
    async with httpx.AsyncClient(
        base_url=small.url, headers={"x-api-key": small.admin_key}, timeout=30
    ) as c:
        yield c


def problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """Assert ``r`` is a JSON problem with ``status`` whose detail names every word."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status and isinstance(body["detail"], str), body
    for word in words:
        assert word in body["detail"], (word, body)
    return body


async def test_malformed_json_wrong_types_and_content_types(api: httpx.AsyncClient) -> None:
    json_header = {"content-type": "application/json"}
    for path in ("/threads", "/assistants", "/threads/search", "/runs", "/store/namespaces"):
        for raw in (b"{bad", b'{"a": 1,}', b"[1, 2", b"\xff\xfe"):
            r = await api.post(path, content=raw, headers=json_header)
            problem(r, 400, "malformed JSON")
    problem(await api.post("/threads", json={"metadata": "x"}), 422, "metadata")
    problem(await api.post("/threads", json=[1, 2]), 422)
    problem(await api.post("/assistants", json={"graph_id": 5}), 422, "graph_id")
    problem(await api.post("/assistants", json={}), 422, "graph_id", "required")
    problem(await api.post("/threads/search", json={"limit": "ten"}), 422, "limit")
    problem(await api.post("/threads/search", json={"limit": 0}), 422, "limit")
    problem(await api.post("/threads/search", json={"status": "sleeping"}), 422, "status")
    problem(await api.post("/assistants/search", json={"sort_by": "secret"}), 422, "sort_by")
    body = {"namespace": ["a"], "key": "k", "value": [1]}
    problem(await api.put("/store/items", json=body), 422, "value")
    problem(await api.post("/admin/keys", json={"tenant_id": "t2", "scope": 1}), 422, "scope")

    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        r = await api.post("/threads", content=b'{"metadata": {}}', headers={"content-type": ctype})
        problem(r, 415, "application/json")
    r = await api.post("/threads", content=b"{}", headers={"content-type": ""})
    problem(r, 415)
    r = await api.request(
        "DELETE", "/store/items", content=b"k=v", headers={"content-type": "text/plain"}
    )
    problem(r, 415)
    assert (await api.post("/threads", content=b"{}", headers=json_header)).status_code == 200
    r = await api.post("/threads", json={}, headers={"content-type": "application/merge+json"})
    assert r.status_code == 200


async def test_oversized_bodies_are_413_with_or_without_content_length(
    api: httpx.AsyncClient,
) -> None:
    big = {"metadata": {"pad": "x" * LIMIT}}
    problem(await api.post("/threads", json=big), 413, f"{LIMIT}-byte limit")
    put = {"namespace": ["a"], "key": "k", "value": {"pad": "x" * LIMIT}}
    problem(await api.put("/store/items", json=put), 413)

    async def chunks(total: int) -> AsyncIterator[bytes]:
        body = b'{"metadata": {"pad": "' + b"x" * total + b'"}}'
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    header = {"content-type": "application/json"}
    r = await api.post("/threads", content=chunks(LIMIT * 3), headers=header)
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    problem(r, 413, f"{LIMIT}-byte limit")
    r = await api.post("/threads", content=chunks(LIMIT // 2), headers=header)  # under it: fine
    assert r.status_code == 200 and len(r.json()["metadata"]["pad"]) == LIMIT // 2
    # nothing of the refused bodies was stored
    assert (await api.post("/threads/count", json={})).json() == 1
    assert (await api.post("/store/items/search", json={})).json() == {"items": []}


async def test_bad_query_params_and_unknown_ids(api: httpx.AsyncClient) -> None:
    thread = (await api.post("/threads", json={})).json()["thread_id"]
    for query in ("limit=-1", "limit=abc", "limit=0", "limit=100000", "offset=-1", "offset=1e99"):
        problem(await api.get(f"/threads/{thread}/runs?{query}"), 422, "query.")
    problem(await api.get(f"/threads/{thread}/runs?status=sleeping"), 422, "status")
    for query in ("limit=0", "limit=abc", "limit=-5", "limit=1001", "before=" + "x" * 65):
        problem(await api.get(f"/threads/{thread}/history?{query}"), 422, "query.")
    problem(await api.post(f"/threads/{thread}/history", json={"limit": 0}), 422, "limit")
    r = await api.post(f"/threads/{thread}/history", json={"before": {"checkpoint_id": 5}})
    problem(r, 422, "before")
    assert (await api.get(f"/threads/{thread}/history?limit=3")).json() == []
    problem(await api.post(f"/threads/{thread}/runs/x/cancel?action=explode"), 422, "action")
    problem(await api.post(f"/threads/{thread}/runs/x/cancel?wait=maybe"), 422, "wait")
    problem(await api.get("/store/items?namespace=a"), 422, "key")
    problem(await api.post("/assistants/a/latest", json={"version": 10**20}), 422, "version")
    problem(await api.post("/threads/search", json={"offset": 10**20}), 422, "offset")

    for path in (
        "/threads/nope",
        "/threads/nope/state",
        "/threads/nope/runs",
        f"/threads/{thread}/runs/nope",
        f"/threads/{thread}/state/nope",
        "/assistants/nope",
        "/runs/nope",
    ):
        problem(await api.get(path), 404, "'nope' not found")
    missing = await api.get("/store/items?namespace=a&key=nope")  # as LangGraph: 200, null
    assert (missing.status_code, missing.json()) == (200, None)
    problem(await api.get("/no/such/route"), 404)
    problem(await api.put("/threads"), 405)
    problem(await api.get("/threads/a%00b"), 400, "NUL")
    problem(await api.get("/store/items?namespace=a&key=%00"), 400, "NUL")


async def test_invalid_assistant_config_is_422_and_changes_nothing(
    api: httpx.AsyncClient,
) -> None:
    cases = [
        ({"configurable": {"tools": ["calculator", "rm_rf"]}}, "unknown tool 'rm_rf'"),
        ({"configurable": {"model": "acme:gpt"}}, "unknown model 'acme:gpt'"),
        ({"configurable": {"model": "gpt-4o"}}, "unknown model"),
        ({"configurable": {"model": "local:huge"}}, "local:smollm2"),
        ({"configurable": {"max_steps": "many"}}, "max_steps"),
        ({"configurable": {"max_steps": 1.5}}, "max_steps"),
        ({"configurable": {"tools": "calculator"}}, "tools"),
        ({"configurable": {"temperature": "hot"}}, "temperature"),
    ]
    for config, words in cases:
        r = await api.post("/assistants", json={"graph_id": "agent", "config": config})
        problem(r, 422, words)
    problem(await api.post("/assistants", json={"graph_id": "nope"}), 422, "graph_id 'nope'")
    problem(
        await api.post("/assistants", json={"graph_id": "agent", "context": {"max_steps": "x"}}),
        422,
        "max_steps",
    )
    assert (await api.post("/assistants/count", json={})).json() == 0

    created = (await api.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
    for config, words in cases:
        r = await api.patch(f"/assistants/{created['assistant_id']}", json={"config": config})
        problem(r, 422, words)
    after = (await api.get(f"/assistants/{created['assistant_id']}")).json()
    assert after["version"] == 1 and after["config"] == CALC

    thread = (await api.post("/threads", json={})).json()["thread_id"]
    run = {"assistant_id": created["assistant_id"], "input": ASK, "config": cases[0][0]}
    problem(await api.post(f"/threads/{thread}/runs", json=run), 422, "rm_rf")
    assert (await api.get(f"/threads/{thread}/runs")).json() == []


async def test_invalid_run_input_is_422_and_queues_nothing(api: httpx.AsyncClient) -> None:
    assistant = (await api.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
    thread = (await api.post("/threads", json={})).json()["thread_id"]
    user = {"role": "user", "content": "hi"}
    cases = [
        ({"messages": 5}, "input.messages must be a list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown message role 'robot'"),
        ({"messages": [{"content": "no role"}]}, "unknown message role"),
        ({"messages": [5]}, "each message must be an object"),
        ({"messages": [{"role": "user", "content": {"x": 1}}]}, "content must be a string"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({"messages": [{"role": "ai", "content": "", "tool_calls": 7}]}, "tool_calls"),
        ({"messages": [{"role": "ai", "content": "", "tool_calls": [1]}]}, "tool_calls"),
        (
            {"messages": [{"role": "ai", "content": "", "tool_calls": [{"function": "f"}]}]},
            "function",
        ),
    ]
    for path in (f"/threads/{thread}/runs", f"/threads/{thread}/runs/wait", "/runs", "/runs/wait"):
        for run_input, words in cases:
            body = {"assistant_id": assistant["assistant_id"], "input": run_input}
            problem(await api.post(path, json=body), 422, words)
        body = {"assistant_id": assistant["assistant_id"], "input": [user]}
        problem(await api.post(path, json=body), 422, "input")
        body = {"assistant_id": assistant["assistant_id"], "input": ASK, "stream_mode": "all"}
        problem(await api.post(path, json=body), 422, "stream_mode")
        body = {"assistant_id": assistant["assistant_id"], "multitask_strategy": "yolo"}
        problem(await api.post(path, json=body), 422, "multitask_strategy")
    long_id = "t" * 65
    body = {"assistant_id": assistant["assistant_id"], "input": ASK, "if_not_exists": "create"}
    problem(await api.post(f"/threads/{long_id}/runs", json=body), 422, "64 characters")
    assert (await api.get(f"/threads/{thread}/runs")).json() == []
    assert (await api.get(f"/threads/{thread}")).json()["status"] == "idle"
    assert (await api.post("/threads/count", json={})).json() == 1  # no stateless threads

    for values, words in (
        ({"messages": 5}, "values.messages must be a list"),
        ({"messages": [{"role": "user", "content": "x", "id": [1]}]}, "id must be a string"),
        ({"messages": [{"role": "nobody"}]}, "unknown message role"),
        ({"summary": "x"}, "unknown state keys"),
    ):
        r = await api.post(f"/threads/{thread}/state", json={"values": values})
        problem(r, 422, words)
    assert (await api.get(f"/threads/{thread}/state")).json()["values"] == {}


async def test_bad_namespaces_and_unstorable_values(api: httpx.AsyncClient) -> None:
    for namespace in (["a.b"], ["a", ""], ["ok", "x\x1fy"], ["n" * 600, "m" * 600]):
        body = {"namespace": namespace, "key": "k", "value": {}}
        problem(await api.put("/store/items", json=body), 422, "namespace")
        r = await api.request("DELETE", "/store/items", json={"namespace": namespace, "key": "k"})
        problem(r, 422, "namespace")
        problem(await api.post("/store/items/search", json={"namespace_prefix": namespace}), 422)
        problem(await api.post("/store/namespaces", json={"prefix": namespace}), 422)
    problem(await api.put("/store/items", json={"namespace": [], "key": "k", "value": {}}), 422)
    problem(await api.get("/store/items?namespace=a..b&key=k"), 422, "namespace")
    problem(await api.get("/store/items?namespace=.a&key=k"), 422, "namespace")

    # values PostgreSQL cannot store are refused on SQLite too, before they reach a database
    for body, words in (
        ({"metadata": {"note": "nul\x00here"}}, "metadata.note: text may not contain NUL"),
        ({"metadata": {"k\x00": 1}}, "(key): text may not contain NUL"),
        ({"thread_id": "a\x00b"}, "NUL"),
        ({"metadata": {"deep": _nested(40)}}, "nested deeper than 32"),
    ):
        problem(await api.post("/threads", json=body), 422, words)
    for raw in (b'{"metadata": {"x": NaN}}', b'{"metadata": {"x": -Infinity}}'):
        r = await api.post("/threads", content=raw, headers={"content-type": "application/json"})
        problem(r, 422, "finite")
    raw = b'{"metadata": {"x": "\\ud800"}}'  # a lone surrogate
    r = await api.post("/threads", content=raw, headers={"content-type": "application/json"})
    problem(r, 422, "Unicode")
    put = {"namespace": ["a"], "key": "k\x00", "value": {}}
    problem(await api.put("/store/items", json=put), 422, "NUL")
    assert (await api.post("/threads/count", json={})).json() == 0


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"d": value}
    return value


async def test_odd_metadata_filters_answer_and_match_exactly(api: httpx.AsyncClient) -> None:
    documents = [
        {"n": 1, "flag": True, "name": "ada", 'we"ird': "q", "é": "e", "big": 10**30},
        {"n": "1", "flag": 1, "name": "bob", "nested": {"a": [1, 2]}},
        {"n": 1.0, "flag": False, "name": None},
    ]
    for i, metadata in enumerate(documents):
        r = await api.post("/threads", json={"thread_id": f"doc{i}", "metadata": metadata})
        assert r.status_code == 200, r.text
    expected = [
        ({"n": 1}, ["doc0", "doc2"]),
        ({"n": "1"}, ["doc1"]),
        ({"flag": True}, ["doc0"]),
        ({"flag": 1}, ["doc1"]),
        ({"flag": False}, ["doc2"]),
        ({"name": None}, ["doc2"]),
        ({'we"ird': "q"}, ["doc0"]),
        ({"é": "e"}, ["doc0"]),
        ({"big": 10**30}, ["doc0"]),
        ({"big": -(10**30)}, []),
        ({"nested": {"a": [1, 2]}}, ["doc1"]),
        ({"nested": {"a": [1]}}, []),
        ({"missing": None}, []),
        ({"x\ty": [], "": {}}, []),
    ]
    for metadata, ids in expected:
        found = await api.post("/threads/search", json={"metadata": metadata, "limit": 1000})
        assert sorted(t["thread_id"] for t in found.json()) == ids, metadata
        count = await api.post("/threads/count", json={"metadata": metadata})
        assert count.json() == len(ids), metadata
    # pages are full even when part of the filter is decided after the query
    page = await api.post(
        "/threads/search", json={"metadata": {"é": "e", "n": 1}, "limit": 1, "offset": 0}
    )
    assert [t["thread_id"] for t in page.json()] == ["doc0"]
    page = await api.post(
        "/threads/search",
        json={"metadata": {"nested": {"a": [1, 2]}}, "limit": 1, "sort_by": "thread_id"},
    )
    assert [t["thread_id"] for t in page.json()] == ["doc1"]
    values = await api.post("/threads/search", json={"values": {"messages": []}})
    assert values.status_code == 200 and values.json() == []


# --- clients that misbehave on a stream -----------------------------------------------


async def _raw_stream(server: LiveServer, path: str, body: bytes) -> tuple[Any, Any, bytes]:
    """Open an SSE request on a raw socket; returns the streams and the first event."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: nimbus\r\nx-api-key: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), server.admin_key.encode(), len(body), body)
    )
    await writer.drain()
    received = b""
    while not (b"event: metadata" in received and b"\n\n" in received.split(b"event: ")[1]):
        chunk = await asyncio.wait_for(reader.read(65536), 30)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return reader, writer, received


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 30) -> None:
    """Poll ``check`` until it holds, failing after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_vanished_and_stalled_stream_clients_neither_block_nor_lose_runs(
    small: LiveServer, api: httpx.AsyncClient
) -> None:
    small.fake.latency = 1.5  # each model call takes a while: the runs outlive their clients
    assistant = (await api.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
    body = {
        "assistant_id": assistant["assistant_id"],
        "input": ASK,
        "stream_mode": ["values", "messages-tuple"],
    }
    # 1. a client that reads the first event and then resets the connection
    gone = (await api.post("/threads", json={})).json()["thread_id"]
    _, writer, first = await _raw_stream(small, f"/threads/{gone}/runs/stream", orjson.dumps(body))
    assert b"event: metadata" in first
    writer.transport.abort()  # RST, no goodbye
    # 2. a client that stops reading after the first event, connection left open
    stalled = (await api.post("/threads", json={})).json()["thread_id"]
    _, stalled_writer, _ = await _raw_stream(
        small, f"/threads/{stalled}/runs/stream", orjson.dumps(body)
    )
    # 3. an httpx client that closes its stream after the first event
    closed = (await api.post("/threads", json={})).json()["thread_id"]
    async with api.stream("POST", f"/threads/{closed}/runs/stream", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                assert line == "event: metadata"
                break

    # meanwhile the server answers, quickly, while the three runs are still going
    started = time.monotonic()
    assert (await api.get("/ok")).json() == {"ok": True}
    assert (await api.get(f"/threads/{gone}")).json()["status"] == "busy"
    assert (await api.post("/threads/count", json={})).json() == 3
    assert time.monotonic() - started < 5

    # and every run completes with its values: none was lost with its client
    for thread in (gone, stalled, closed):
        runs = (await api.get(f"/threads/{thread}/runs")).json()
        assert len(runs) == 1
        joined = await api.get(f"/threads/{thread}/runs/{runs[0]['run_id']}/join")
        assert joined.status_code == 200
        assert joined.json()["messages"][-1]["content"] == "The result is 42."
        run = (await api.get(f"/threads/{thread}/runs/{runs[0]['run_id']}")).json()
        assert run["status"] == "success"
        assert (await api.get(f"/threads/{thread}")).json()["status"] == "idle"
        # a client that comes back replays the whole stream
        replay = await api.get(f"/threads/{thread}/runs/{runs[0]['run_id']}/stream")
        assert replay.text.startswith("event: metadata") and "event: values" in replay.text
    stalled_writer.transport.abort()

    # asked to, a disconnect cancels the run instead
    cancel = (await api.post("/threads", json={})).json()["thread_id"]
    _, writer, _ = await _raw_stream(
        small,
        f"/threads/{cancel}/runs/stream",
        orjson.dumps({**body, "on_disconnect": "cancel"}),
    )
    writer.transport.abort()

    async def interrupted() -> bool:
        runs = (await api.get(f"/threads/{cancel}/runs")).json()
        return bool(runs) and runs[0]["status"] == "interrupted"

    await _until(interrupted)
    assert (await api.get("/ok")).status_code == 200
