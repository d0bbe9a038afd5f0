"""The real openai client against the /v1 facade of a live Nimbus, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import LiveServer, live_server

CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
ASK = [{"role": "user", "content": "What is 6 times 7?"}]


def _http(server: LiveServer, key: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers={"x-api-key": key or server.admin_key})


async def _create_assistant(server: LiveServer, name: str = "calc", key: str | None = None) -> Any:
    async with _http(server, key) as http:
        r = await http.post("/assistants", json={"graph_id": "agent", "config": CALC, "name": name})
        r.raise_for_status()
        return r.json()


async def _threads(server: LiveServer) -> list[Any]:
    async with _http(server) as http:
        r = await http.post("/threads/search", json={"limit": 100})
        r.raise_for_status()
        found: list[Any] = r.json()
        return found


async def _tenant_key(server: LiveServer, tenant: str, scope: str = "read-write") -> str:
    async with _http(server) as http:
        r = await http.post("/admin/keys", json={"tenant_id": tenant, "scope": scope})
        r.raise_for_status()
        key: str = r.json()["key"]
        return key


def _client(server: LiveServer, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=key or server.admin_key, max_retries=0
    )


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with _client(server) as c:
        yield c


async def test_models_are_the_tenants_assistants(
    server: LiveServer, client: openai.AsyncOpenAI
) -> None:
    older = await _create_assistant(server, "older")
    calc = await _create_assistant(server)
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [calc["assistant_id"], older["assistant_id"]]
    assert models[0].object == "model" and models[0].owned_by == "nimbus"
    assert models[0].model_extra == {"name": "calc"}
    assert models[0].created > 0
    by_name = await client.models.retrieve("calc")
    assert by_name.id == calc["assistant_id"]


async def test_completion_by_id_and_by_name(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    calc = await _create_assistant(server)
    for model in (calc["assistant_id"], "calc"):
        done = await client.chat.completions.create(model=model, messages=ASK)
        assert done.object == "chat.completion" and done.model == model
        choice = done.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == "The result is 42."
        assert choice.message.tool_calls is None  # tools ran in Nimbus
        assert choice.finish_reason == "stop"
        assert done.usage is not None and done.usage.total_tokens > 0
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert await _threads(server) == []  # stateless: the temporary threads are gone


async def test_an_answer_never_waits_for_a_poll(database_url: str, tmp_path: Path) -> None:
    # Servers look at the database every NIMBUS_POLL_S for what they missed. A completion
    # once waited a whole poll on PostgreSQL after its run had ended (the run's row, as
    # queued, still said pending): a second per request at the default of 1 s.
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake,
        live_server(database_url, fake, tmp_path, NIMBUS_POLL_S="30") as server,
        _client(server) as client,
    ):
        await _create_assistant(server)
        for stream in (False, True, False):
            started = time.monotonic()
            if stream:
                chunks = await client.chat.completions.create(
                    model="calc", messages=ASK, stream=True
                )
                text = "".join([c.choices[0].delta.content or "" async for c in chunks])
            else:
                done = await client.chat.completions.create(model="calc", messages=ASK)
                text = done.choices[0].message.content or ""
            assert text == "The result is 42."
            assert time.monotonic() - started < 15  # far below the poll's 30 s
        assert await _threads(server) == []


async def test_conversation_system_message_parts_and_settings(
    server: LiveServer, client: openai.AsyncOpenAI
) -> None:
    await _create_assistant(server)
    done = await client.chat.completions.create(
        model="calc",
        messages=[
            {"role": "system", "content": "Answer tersely."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "6 "}, {"type": "text", "text": "* 7?"}],
            },
        ],
        max_tokens=77,
        temperature=0.5,
    )
    assert done.choices[0].message.content == "The result is 42."
    first = server.fake.requests[0]
    sent = [(m["role"], m["content"]) for m in first["messages"]]
    assert ("system", "Answer tersely.") in sent
    assert sent[-3:] == [("user", "hi"), ("assistant", "Hello."), ("user", "6 * 7?")]
    assert first["max_tokens"] == 77 and first["temperature"] == 0.5


async def test_streamed_completion(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    await _create_assistant(server)
    stream = await client.chat.completions.create(
        model="calc", messages=ASK, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) > 1  # token by token
    assert "".join(deltas) == "The result is 42."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.total_tokens > 0
    assert await _threads(server) == []


async def test_streamed_without_usage(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    await _create_assistant(server)
    stream = await client.chat.completions.create(model="calc", messages=ASK, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The result is 42."


async def test_failed_run_is_502(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    await _create_assistant(server)
    for stream in (False, True):
        server.fake.faults.append((500, {}, None))  # the upstream model fails
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="calc", messages=ASK, stream=stream)
        assert failed.value.status_code == 502
        assert failed.value.code == "upstream_model_failed"
        assert "upstream model failed" in failed.value.message
    assert await _threads(server) == []


async def test_errors_are_openai_errors(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    await _create_assistant(server)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nope", messages=ASK)
    assert missing.value.code == "model_not_found"
    assert missing.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as empty:
        await client.chat.completions.create(model="calc", messages=[])
    assert empty.value.param == "messages"
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    bad_bodies: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": [image]}]},
        {"messages": [{"role": "user", "content": [{"type": {"not": "a name"}}]}]},
        {"messages": [{"role": "tool", "content": "42"}]},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": ASK, "temperature": 9},
        {"messages": ASK, "n": 2},
        {"messages": ASK, "tools": [{"type": "function", "function": {"name": "f"}}]},
    ]
    for extra in bad_bodies:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="calc", **extra)
        assert bad.value.type == "invalid_request_error"
    async with _http(server) as http:
        r = await http.post("/v1/chat/completions", json={"model": "calc"})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages"
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post(
            "/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] is None
        assert "not valid JSON" in r.json()["error"]["message"]
        r = await http.get("/v1/embeddings")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = await http.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()


async def test_auth_and_tenancy(server: LiveServer, client: openai.AsyncOpenAI) -> None:
    calc = await _create_assistant(server)
    async with _client(server, "nmb_wrong") as wrong:
        with pytest.raises(openai.AuthenticationError) as denied:
            await wrong.chat.completions.create(model="calc", messages=ASK)
        assert denied.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
    other_key = await _tenant_key(server, "other")
    async with _client(server, other_key) as other:
        assert [m async for m in other.models.list()] == []
        for model in (calc["assistant_id"], "calc"):
            with pytest.raises(openai.NotFoundError):
                await other.chat.completions.create(model=model, messages=ASK)
    reader_key = await _tenant_key(server, "other", "read-only")
    async with _client(server, reader_key) as reader:
        assert [m async for m in reader.models.list()] == []
        with pytest.raises(openai.PermissionDeniedError):
            await reader.chat.completions.create(model="calc", messages=ASK)
