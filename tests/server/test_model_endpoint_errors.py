"""A misbehaving model endpoint against a live server, on SQLite and PostgreSQL.

The operator's secrets never reach a tenant: the endpoint's base URL carries credentials and
an Azure-style ``api-key`` query parameter, and the endpoint answers errors that echo the
request it was sent (its ``Authorization: Bearer <OPENAI_API_KEY>`` included), as a
misbehaving proxy would. None of it may show in what a tenant reads about the failed runs,
in what the database stores (the runs' ``error``, which the API does not show, their
events), nor in the server's log.

An answer larger than ``NIMBUS_MODEL_MAX_RESPONSE_BYTES`` fails the run, saying so.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from nimbus.testing.fake_openai import ECHO_REQUEST, FakeOpenAIServer, Fault
from tests.server.conftest import LiveServer, live_server

KEY = "sk-operator-secret-" + "9f8e7d6c5b4a" * 3
USER, PASSWORD, QUERY_SECRET = "nimbus-user", "pw-secret-123", "qsecret-456"
ASK = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}
MODEL = {"configurable": {"model": "openai:fake-model"}}


def leaks(text: str) -> list[str]:
    """The secrets ``text`` shows: the URL's, or the key whole or by any 8 characters of it."""
    parts = [USER, PASSWORD, QUERY_SECRET, *(KEY[i : i + 8] for i in range(len(KEY) - 7))]
    return [s for s in parts if s in text]


def echoes() -> list[Fault]:
    """Error answers that repeat the operator's secrets, one per model call."""
    said = f"key {KEY} refused; Authorization: Bearer {KEY}; api-key={QUERY_SECRET}"
    stream = "".join(
        f"data: {orjson.dumps(event).decode()}\n\n"
        for event in (
            {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
            {"error": {"message": said}},
        )
    )
    text = (403, {"Content-Type": "text/plain"}, said)
    return [
        (401, {}, ECHO_REQUEST),
        (500, {}, ECHO_REQUEST),
        text,
        text,
        (200, {"Content-Type": "text/event-stream"}, stream),  # an error mid-stream
    ]


async def test_failed_runs_show_no_secret(database_url: str, tmp_path: Path) -> None:
    async with FakeOpenAIServer() as fake:
        base_url = f"http://{USER}:{PASSWORD}@127.0.0.1:{fake.port}/v1?api-key={QUERY_SECRET}"
        env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": KEY}
        async with live_server(database_url, fake, tmp_path, **env) as server:
            shown = await _what_tenants_see(server, fake)
            stored = await _stored_rows(database_url)
            logs = server.logs()
    assert len(shown) >= 12
    for where, text in shown:
        assert leaks(text) == [], f"{where}: {text}"
    for table, row in stored:
        assert leaks(row) == [], f"{table}: {row}"
    assert leaks(logs) == [], logs
    # the errors are still useful: the endpoint, with its secrets masked, and what it said
    endpoint = f"POST http://127.0.0.1:{fake.port}/v1/chat/completions?api-key=***"
    errors = [row for table, row in stored if table == "runs"]
    assert len(errors) == 2  # stateless runs are deleted with their threads
    assert any(f"{endpoint} answered 401: Injected fault 401" in e for e in errors), errors
    assert any("Authorization: ***" in e for e in errors), errors
    assert any(f"{endpoint} answered 403: key *** refused" in e for e in errors), errors
    said = dict(shown)
    assert f"{endpoint} answered 401" in said["runs.stream"]
    assert f"{endpoint} answered 500" in said["/runs/wait"]
    assert f"{endpoint} answered 403" in said["threads/runs/wait"]
    assert "answered 403: key *** refused" in said["facade 502"]
    assert "reported an error mid-stream: key *** refused" in said["facade stream"]


async def _what_tenants_see(server: LiveServer, fake: FakeOpenAIServer) -> list[tuple[str, str]]:
    """Every place a failed run's error shows, as ``(where, text)``; one fault per run."""
    shown: list[tuple[str, str]] = []
    faults = echoes()
    headers = {"x-api-key": server.admin_key}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
        r = await http.post("/assistants", json={"graph_id": "agent", "config": MODEL, "name": "m"})
        r.raise_for_status()
        assistant = r.json()["assistant_id"]
        run = {"assistant_id": assistant, "input": ASK}

        # runs.stream: the SSE error event, then the run and thread as stored
        fake.faults.append(faults[0])
        thread = (await http.post("/threads", json={})).json()["thread_id"]
        body = {**run, "stream_mode": ["values", "messages-tuple"]}
        async with http.stream("POST", f"/threads/{thread}/runs/stream", json=body) as r:
            stream = (await r.aread()).decode()
        assert "event: error" in stream, stream
        shown.append(("runs.stream", stream))
        [stored] = (await http.get(f"/threads/{thread}/runs")).json()
        assert stored["status"] == "error"
        run_id = stored["run_id"]
        for where, path in [
            ("GET run", f"/threads/{thread}/runs/{run_id}"),
            ("GET /runs/id", f"/runs/{run_id}"),
            ("attempts", f"/runs/{run_id}/attempts"),
            ("runs list", f"/threads/{thread}/runs"),
            ("thread", f"/threads/{thread}"),
            ("thread state", f"/threads/{thread}/state"),
            ("replayed stream", f"/threads/{thread}/runs/{run_id}/stream"),
        ]:
            r = await http.get(path)
            assert r.status_code == 200, (path, r.text)
            shown.append((where, r.text))

        # /runs/wait: __error__ in the values
        fake.faults.append(faults[1])
        r = await http.post("/runs/wait", json=run)
        values = r.json()
        assert "__error__" in values, r.text
        shown.append(("/runs/wait", values["__error__"]["message"]))
        shown.append(("/runs/wait body", r.text))
        fake.faults.append(faults[2])
        thread = (await http.post("/threads", json={})).json()["thread_id"]
        r = await http.post(f"/threads/{thread}/runs/wait", json=run)
        shown.append(("threads/runs/wait", r.json()["__error__"]["message"]))

        # the OpenAI facade: a 502, and an error object in a stream
        chat = {"model": "m", "messages": ASK["messages"]}
        fake.faults.append(faults[3])
        r = await http.post("/v1/chat/completions", json=chat)
        assert r.status_code == 502, r.text
        shown.append(("facade 502", r.json()["error"]["message"]))
        fake.faults.append(faults[4])
        async with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            text = (await r.aread()).decode()
        assert r.status_code in (200, 502), text
        shown.append(("facade stream", text))
    assert not fake.faults  # every fault was answered
    return shown


async def _stored_rows(database_url: str) -> list[tuple[str, str]]:
    """Every row of every table, as ``(table, text)``, read from the database directly."""
    rows: list[tuple[str, Any]] = []
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            names = "SELECT name FROM sqlite_master WHERE type = 'table'"
            for (table,) in conn.execute(names).fetchall():
                rows += [(table, r) for r in conn.execute(f'SELECT * FROM "{table}"')]
    else:
        conn = await asyncpg.connect(database_url)
        try:
            names = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            for (table,) in await conn.fetch(names):
                rows += [(table, tuple(r)) for r in await conn.fetch(f'SELECT * FROM "{table}"')]
        finally:
            await conn.close()
    return [(table, " | ".join(map(_text, row))) for table, row in rows]


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


async def test_an_answer_over_the_size_limit_fails_the_run(
    database_url: str, tmp_path: Path
) -> None:
    words = " ".join(["word"] * 5000)  # 25 kB
    huge = {"choices": [{"message": {"content": words}, "finish_reason": "stop"}]}
    env = {"NIMBUS_MODEL_MAX_RESPONSE_BYTES": "16384", "NIMBUS_MODEL_MAX_RETRIES": "2"}
    async with (
        FakeOpenAIServer(faults=[(200, {}, huge)]) as fake,
        live_server(database_url, fake, tmp_path, **env) as server,
        httpx.AsyncClient(
            base_url=server.url, headers={"x-api-key": server.admin_key}, timeout=60
        ) as http,
    ):
        r = await http.post("/assistants", json={"graph_id": "agent", "config": MODEL})
        run = {"assistant_id": r.json()["assistant_id"], "input": ASK}
        values = (await http.post("/runs/wait", json=run)).json()
        assert "answered more than 16384 bytes" in values["__error__"]["message"], values
        assert "NIMBUS_MODEL_MAX_RESPONSE_BYTES" in values["__error__"]["message"]
        assert fake.request_count == 1  # not retried: it would be as large again
        values = (await http.post("/runs/wait", json=run)).json()
        assert values["messages"][-1]["content"] == "Echo: What is 6 times 7?"  # next one works
