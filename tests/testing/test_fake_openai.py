"""Tests for the fake OpenAI-compatible server (nimbus.testing.fake_openai)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall as FunctionCall

from nimbus.testing.fake_openai import MODEL_ID, FakeOpenAIServer, spawn_fake_server

TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {}, "b": {}}},
        },
    },
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
]
ARGS = '{"a": 2, "b": 3}'


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer(tool_arguments=ARGS) as srv:
        yield srv


@pytest.fixture
async def client(server: FakeOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0) as c:
        yield c


async def _raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return out


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def test_tool_call_response(server: FakeOpenAIServer, client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="my-model", messages=[{"role": "user", "content": "add 2 and 3"}], tools=TOOLS
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "my-model"
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert isinstance(calls[0], FunctionCall)
    assert calls[0].id.startswith("call_")
    assert calls[0].function.name == "add"
    assert json.loads(calls[0].function.arguments) == {"a": 2, "b": 3}
    assert resp.usage is not None and resp.usage.total_tokens == (
        resp.usage.prompt_tokens + resp.usage.completion_tokens
    )
    assert server.request_count == 1
    assert server.requests[0]["tools"][0]["function"]["name"] == "add"


async def test_final_answer_after_tool_message(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="m",
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "add 2 and 3"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "add", "arguments": ARGS},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        ],
    )
    assert resp.choices[0].message.content == "The result is 5."
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"


async def test_echo_without_tools_and_with_tool_calls_disabled() -> None:
    async with (
        FakeOpenAIServer(tool_calls=False) as srv,
        openai.AsyncOpenAI(base_url=srv.base_url, api_key="t", max_retries=0) as c,
    ):
        msgs: list[Any] = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
        resp = await c.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
        assert resp.choices[0].message.content == "Echo: hi"
        assert resp.choices[0].message.tool_calls is None


async def test_streamed_tool_call(server: FakeOpenAIServer, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "add"}],
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    name, args, call_id, finish, usage, roles = "", "", None, None, None, []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                call_id = tc.id or call_id
                name += (tc.function and tc.function.name) or ""
                args += (tc.function and tc.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert roles == ["assistant"]
    assert call_id is not None and call_id.startswith("call_")
    assert name == "add"
    assert json.loads(args) == {"a": 2, "b": 3}
    assert finish == "tool_calls"
    assert usage is not None and usage.total_tokens > 0


async def test_streamed_text(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    pieces, finish = [], None
    async for chunk in stream:
        assert chunk.usage is None
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == "Echo: one two three"
    assert len(pieces) == 4
    assert finish == "stop"


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == [MODEL_ID]


async def test_fault_is_rate_limit_error_then_recovers() -> None:
    fault = (429, {"Retry-After": "0"}, {"error": {"message": "slow down", "type": "rate"}})
    async with (
        FakeOpenAIServer(faults=[fault]) as srv,
        openai.AsyncOpenAI(base_url=srv.base_url, api_key="t", max_retries=0) as c,
    ):
        msgs: list[Any] = [{"role": "user", "content": "x"}]
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="m", messages=msgs)
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "0"
        assert "slow down" in str(info.value)
        resp = await c.chat.completions.create(model="m", messages=msgs)
        assert resp.choices[0].message.content == "Echo: x"
        assert srv.request_count == 2 and len(srv.requests) == 2


async def test_sdk_retries_through_500_fault() -> None:
    async with (
        FakeOpenAIServer(faults=[(500, {"retry-after-ms": "1"}, None)]) as srv,
        openai.AsyncOpenAI(base_url=srv.base_url, api_key="t", max_retries=2) as c,
    ):
        resp = await c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "y"}]
        )
        assert resp.choices[0].message.content == "Echo: y"
        assert srv.request_count == 2
        assert not srv.faults


async def test_unknown_path_is_404(server: FakeOpenAIServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.base_url}/nope") as r:
            assert r.status == 404
            body = await r.json()
        async with s.get(f"{server.base_url}/chat/completions") as r:
            assert r.status == 405
    assert body["error"]["type"] == "invalid_request_error"
    assert "/v1/nope" in body["error"]["message"]


async def test_bad_requests_are_400(server: FakeOpenAIServer) -> None:
    url = f"{server.base_url}/chat/completions"
    async with aiohttp.ClientSession() as s:
        async with s.post(
            url, data=b"{not json", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
            body = await r.json()
        assert body["error"]["type"] == "invalid_request_error"
        async with s.post(url, json={"model": "m", "messages": []}) as r:
            assert r.status == 400
            assert "messages" in (await r.json())["error"]["message"]
        async with s.post(url, json={"messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 400
        # The connection stays usable after a 400 reply.
        async with s.post(
            url, json={"model": "m", "messages": [{"role": "user", "content": "ok"}]}
        ) as r:
            assert r.status == 200
    assert server.request_count == 4
    assert len(server.requests) == 3  # the malformed body is not recorded


async def test_keep_alive_many_requests_one_connection(server: FakeOpenAIServer) -> None:
    url = f"{server.base_url}/chat/completions"
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as s:
        for i in range(50):
            payload: dict[str, Any] = {
                "model": "m",
                "messages": [{"role": "user", "content": f"n{i}"}],
            }
            async with s.post(url, json=payload) as r:
                assert r.status == 200
                data = await r.json()
            assert data["choices"][0]["message"]["content"] == f"Echo: n{i}"
        # A streamed (chunked) reply also leaves the connection reusable.
        payload["stream"] = True
        async with s.post(url, json=payload) as r:
            text = await r.text()
        assert text.endswith("data: [DONE]\n\n")
        async with s.get(f"{server.base_url}/models") as r:
            assert r.status == 200
    assert server.connections_accepted == 1
    assert server.request_count == 51


async def test_pipelined_and_fragmented_requests(server: FakeOpenAIServer) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "p"}]})
    reqs = _post("/v1/chat/completions", body) * 2 + _post(
        "/chat/completions", body, "Connection: close\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for i in range(0, len(reqs), 7):  # dribble it out in small pieces
        writer.write(reqs[i : i + 7])
        await writer.drain()
    out = await asyncio.wait_for(reader.read(), 5)  # EOF: "Connection: close" honoured
    writer.close()
    await writer.wait_closed()
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.count(b'"content":"Echo: p"') == 3
    assert out.count(b"Connection: close") == 1
    assert server.request_count == 3


async def test_malformed_http_is_400_and_closed(server: FakeOpenAIServer) -> None:
    out = await _raw(server.port, b"garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"invalid_request_error" in out
    out = await _raw(
        server.port, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 400 ")


async def test_latency_delays_chat_reply() -> None:
    async with FakeOpenAIServer(latency=0.05) as srv:
        loop = asyncio.get_running_loop()
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "z"}]})
        start = loop.time()
        out = await _raw(srv.port, _post("/v1/chat/completions", body, "Connection: close\r\n"))
        assert loop.time() - start >= 0.05
        assert b"Echo: z" in out


async def test_record_false_keeps_only_count() -> None:
    async with (
        FakeOpenAIServer(record=False) as srv,
        openai.AsyncOpenAI(base_url=srv.base_url, api_key="t", max_retries=0) as c,
    ):
        await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        assert srv.requests == []
        assert srv.request_count == 1


def test_spawned_process_serves_and_exits_cleanly() -> None:
    cpu = min(os.sched_getaffinity(0))
    proc, base_url = spawn_fake_server(0.0, tool_arguments=ARGS, cpu=cpu)
    try:
        assert os.sched_getaffinity(proc.pid) == {cpu}
        with openai.OpenAI(base_url=base_url, api_key="t", max_retries=0) as c:
            resp = c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "q"}], tools=TOOLS
            )
        calls = resp.choices[0].message.tool_calls
        assert calls is not None and isinstance(calls[0], FunctionCall)
        assert calls[0].function.name == "add" and calls[0].function.arguments == ARGS
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)
    assert code == 0


def test_spawn_reports_a_dying_server() -> None:
    with pytest.raises(RuntimeError, match="exited with code 2"):
        spawn_fake_server(0.0, tool_arguments="{not json")
