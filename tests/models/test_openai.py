"""The openai: provider end to end against the scripted fake server: wire format, full runs,
streaming, retries, errors, timeouts, secrets and model resolution."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from nimbus.adapters.llm import openai as openai_module
from nimbus.adapters.llm import resolve_model
from nimbus.adapters.llm.openai import MAX_RETRY_AFTER_S, OpenAIModel, retry_delay
from nimbus.adapters.tools.builtin import builtin_tools
from nimbus.core.agent import Agent
from nimbus.core.events import Event, TextDeltaEvent, ToolCallFinished
from nimbus.core.messages import (
    AssistantMessage,
    SystemMessage,
    ToolCall,
    UserMessage,
)
from nimbus.core.model import ModelResponse, ModelSettings, TextDelta, ToolSpec
from nimbus.core.runtime import run
from nimbus.exceptions import (
    ConfigError,
    ModelConnectionError,
    ModelHTTPError,
    ModelResponseError,
)
from nimbus.settings import Settings
from nimbus.testing.fake_openai import MODEL_ID, FakeOpenAIServer

ARGS = '{"expression": "6 * 7"}'
HELLO = [UserMessage("hello world")]
CALC_SPEC = ToolSpec(
    "calculator",
    "Evaluate arithmetic",
    {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
)

MakeModel = Callable[..., OpenAIModel]


@pytest.fixture
async def make_model() -> AsyncIterator[MakeModel]:
    """Builds OpenAIModels (tiny backoff by default) and closes every one at teardown."""
    models: list[OpenAIModel] = []

    def make(base_url: str, **kwargs: Any) -> OpenAIModel:
        options: dict[str, Any] = {"backoff_base_s": 0.001, "backoff_max_s": 0.01, **kwargs}
        model = OpenAIModel(MODEL_ID, base_url=base_url, **options)
        models.append(model)
        return model

    yield make
    for model in models:
        await model.aclose()


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def header_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback server that records each request head and answers one fixed completion
    (the fake server does not record headers)."""
    heads: list[bytes] = []
    body = (
        b'{"model": "m", "choices": [{"index": 0, "finish_reason": "stop",'
        b' "message": {"role": "assistant", "content": "hi"}}], "usage": null}'
    )
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(reply % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", heads
    finally:
        server.close()


# --- non-streamed requests and the wire format ------------------------------------------


async def test_request_returns_a_tool_call_and_sends_the_wire_format(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url, api_key="sk-test")
    messages = [SystemMessage("be brief"), UserMessage("what is 6 * 7?")]
    response = await model.request(
        messages, [CALC_SPEC], ModelSettings(max_tokens=64, temperature=0.25)
    )

    assert isinstance(response, ModelResponse)
    assert isinstance(response.message, AssistantMessage)
    [call] = response.message.tool_calls
    assert isinstance(call, ToolCall)
    assert (call.name, call.arguments) == ("calculator", ARGS)
    assert call.id
    assert response.message.content == ""
    assert response.finish_reason == "tool_calls"
    assert response.model_name == MODEL_ID
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.usage.requests == 1

    assert fake_openai.request_count == 1
    [sent] = fake_openai.requests
    assert sent["model"] == MODEL_ID
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 6 * 7?"},
    ]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluate arithmetic",
                "parameters": CALC_SPEC.parameters,
            },
        }
    ]
    assert sent["tools"][0]["function"]["name"] == "calculator"
    assert sent["max_tokens"] == 64
    assert sent["temperature"] == 0.25
    assert "stream" not in sent
    assert "stream_options" not in sent


async def test_request_without_tools_or_settings_omits_them(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    response = await model.request(HELLO, [], ModelSettings())
    assert response.message.content == "Echo: hello world"
    assert response.message.tool_calls == []
    assert response.finish_reason == "stop"
    [sent] = fake_openai.requests
    assert sent["messages"] == [{"role": "user", "content": "hello world"}]
    for key in ("tools", "max_tokens", "temperature", "stream"):
        assert key not in sent


async def test_tool_spec_without_parameters_gets_an_empty_object_schema(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    await model.request(HELLO, [ToolSpec("ping", "Ping")], ModelSettings())
    function = fake_openai.requests[0]["tools"][0]["function"]
    assert function == {
        "name": "ping",
        "description": "Ping",
        "parameters": {"type": "object", "properties": {}},
    }


async def test_base_url_trailing_slash_and_endpoint(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url + "/")
    assert model.url == f"{fake_openai.base_url}/chat/completions"
    assert model.endpoint == f"POST {fake_openai.base_url}/chat/completions"
    assert model.model_id == f"openai:{MODEL_ID}"
    response = await model.request(HELLO, [], ModelSettings())
    assert response.message.content == "Echo: hello world"


# --- a full run with the real calculator tool ---------------------------------------------


async def test_full_run_with_the_real_calculator(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    tools = builtin_tools().resolve(["calculator"])
    events: list[Event] = []
    agent = Agent(instructions="You compute.", tools=["calculator"])

    result = await run(agent, "What is 6 * 7?", model=model, tools=tools, on_event=events.append)

    assert result.output == "The result is 42."
    assert result.steps == 2
    assert result.usage.requests == 2
    [(call, tool_result)] = result.tool_calls()
    assert (call.name, call.arguments) == ("calculator", ARGS)
    assert tool_result is not None
    assert (tool_result.content, tool_result.is_error) == ("42", False)
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert len(finished) == 1  # the tool ran exactly once
    assert finished[0].result.content == "42"

    assert fake_openai.request_count == 2
    first, second = fake_openai.requests
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert first["tools"][0]["function"]["name"] == "calculator"
    assert first["max_tokens"] == agent.limits.max_tokens
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assistant, tool_message = second["messages"][2:]
    assert assistant == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": "calculator", "arguments": ARGS},
            }
        ],
    }
    assert tool_message == {"role": "tool", "tool_call_id": call.id, "content": "42"}


# --- streaming ----------------------------------------------------------------------------


async def test_stream_text_deltas_add_up_to_the_response(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    items = [item async for item in model.stream(HELLO, [], ModelSettings(max_tokens=32))]

    *deltas, response = items
    assert isinstance(response, ModelResponse)
    assert len(deltas) > 1  # really streamed, in pieces
    assert all(isinstance(d, TextDelta) for d in deltas)
    text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert text == response.message.content == "Echo: hello world"
    assert response.message.tool_calls == []
    assert response.finish_reason == "stop"
    assert response.model_name == MODEL_ID
    # Token counts come only from the include_usage chunk.
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.usage.requests == 1

    [sent] = fake_openai.requests
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 32


async def test_stream_assembles_a_tool_call(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    items = [item async for item in model.stream(HELLO, [CALC_SPEC], ModelSettings())]

    response = items[-1]
    assert isinstance(response, ModelResponse)
    assert not any(isinstance(i, TextDelta) for i in items)
    [call] = response.message.tool_calls
    assert call.id == "call_1"
    assert (call.name, call.arguments) == ("calculator", ARGS)  # both halves joined
    assert response.finish_reason == "tool_calls"
    assert response.usage.input_tokens > 0


async def test_run_with_stream_tokens_emits_text_deltas(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    tools = builtin_tools().resolve(["calculator"])
    events: list[Event] = []

    result = await run(
        Agent(tools=["calculator"]),
        "What is 6 * 7?",
        model=model,
        tools=tools,
        stream_tokens=True,
        on_event=events.append,
    )

    assert result.output == "The result is 42."
    deltas = [e for e in events if isinstance(e, TextDeltaEvent)]
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == "The result is 42."
    assert {d.step for d in deltas} == {2}  # the tool-call step streamed no text
    assert all(r.get("stream") is True for r in fake_openai.requests)
    assert fake_openai.request_count == 2
    tool_message = fake_openai.requests[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"] == "42"


async def test_stream_retries_a_503_before_the_stream_starts(make_model: MakeModel) -> None:
    async with FakeOpenAIServer(faults=[(503, {}, None)]) as server:
        model = make_model(server.base_url, max_retries=1)
        items = [item async for item in model.stream(HELLO, [], ModelSettings())]
    response = items[-1]
    assert isinstance(response, ModelResponse)
    assert response.message.content == "Echo: hello world"
    assert server.request_count == 2


async def test_stream_error_status_is_a_model_http_error(make_model: MakeModel) -> None:
    body = {"error": {"message": "no such model"}}
    async with FakeOpenAIServer(faults=[(404, {}, body)]) as server:
        model = make_model(server.base_url, max_retries=3)
        with pytest.raises(ModelHTTPError) as info:
            [item async for item in model.stream(HELLO, [], ModelSettings())]
    assert info.value.status == 404
    assert "no such model" in str(info.value)
    assert server.request_count == 1


async def test_stream_error_chunk_is_a_model_http_error(make_model: MakeModel) -> None:
    sse = b'data: {"error": {"message": "overloaded mid-stream"}}\n\n'
    fault = (200, {"Content-Type": "text/event-stream"}, sse)
    async with FakeOpenAIServer(faults=[fault]) as server:
        model = make_model(server.base_url)
        with pytest.raises(ModelHTTPError, match="overloaded mid-stream"):
            [item async for item in model.stream(HELLO, [], ModelSettings())]


async def test_stream_malformed_chunk_is_a_model_response_error(make_model: MakeModel) -> None:
    fault = (200, {"Content-Type": "text/event-stream"}, b"data: {not json\n\n")
    async with FakeOpenAIServer(faults=[fault]) as server:
        model = make_model(server.base_url)
        with pytest.raises(ModelResponseError, match="malformed chunk"):
            [item async for item in model.stream(HELLO, [], ModelSettings())]


# --- retries ------------------------------------------------------------------------------


async def test_retries_429_and_503_then_succeeds(make_model: MakeModel) -> None:
    faults = [(429, {"Retry-After": "0"}, None), (503, {}, None)]
    async with FakeOpenAIServer(faults=faults) as server:
        model = make_model(server.base_url, max_retries=2)
        response = await model.request(HELLO, [], ModelSettings())
    assert response.message.content == "Echo: hello world"
    assert server.request_count == 3
    assert len(server.requests) == 3
    assert server.requests[0] == server.requests[2]  # the same body each try


async def test_retry_after_delay_is_honoured(make_model: MakeModel) -> None:
    async with FakeOpenAIServer(faults=[(429, {"Retry-After": "0.2"}, None)]) as server:
        model = make_model(server.base_url, max_retries=1)
        started = time.monotonic()
        response = await model.request(HELLO, [], ModelSettings())
        elapsed = time.monotonic() - started
    assert response.message.content == "Echo: hello world"
    assert server.request_count == 2
    assert elapsed >= 0.2  # a lower bound only: safe on a slow machine


async def test_400_is_not_retried_and_names_endpoint_and_message(make_model: MakeModel) -> None:
    body = {"error": {"message": "Invalid value for 'messages'", "type": "invalid_request"}}
    async with FakeOpenAIServer(faults=[(400, {}, body)]) as server:
        model = make_model(server.base_url, max_retries=3)
        with pytest.raises(ModelHTTPError) as info:
            await model.request(HELLO, [], ModelSettings())
    assert server.request_count == 1
    exc = info.value
    assert exc.status == 400
    endpoint = f"POST {server.base_url}/chat/completions"
    assert exc.endpoint == endpoint
    assert exc.body == "Invalid value for 'messages'"
    assert f"{endpoint} answered 400" in str(exc)
    assert f"{server.base_url}/chat/completions" in str(exc)
    assert "Invalid value for 'messages'" in str(exc)


async def test_non_json_error_body_is_shown_as_text(make_model: MakeModel) -> None:
    fault = (403, {"Content-Type": "text/plain"}, "forbidden by proxy")
    async with FakeOpenAIServer(faults=[fault]) as server:
        model = make_model(server.base_url)
        with pytest.raises(ModelHTTPError, match="answered 403: forbidden by proxy"):
            await model.request(HELLO, [], ModelSettings())
    assert server.request_count == 1


async def test_retries_exhausted_raises_after_exactly_max_retries_plus_one(
    make_model: MakeModel,
) -> None:
    async with FakeOpenAIServer(faults=[(500, {}, None)] * 3) as server:
        model = make_model(server.base_url, max_retries=1)
        with pytest.raises(ModelHTTPError) as info:
            await model.request(HELLO, [], ModelSettings())
    assert info.value.status == 500
    assert "answered 500" in str(info.value)
    assert server.request_count == 2
    assert len(server.faults) == 1  # the third fault was never asked for


def test_retry_delay_retry_after_seconds() -> None:
    assert retry_delay(0, "0", 0.5, 8) == 0.0
    assert retry_delay(0, "2", 0.5, 8) == 2.0
    assert retry_delay(3, "0.25", 0.5, 8) == 0.25  # Retry-After wins over backoff
    assert retry_delay(0, "100000", 0.5, 8) == MAX_RETRY_AFTER_S  # capped


def test_retry_delay_http_date() -> None:
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_delay(0, future, 0.5, 8) <= 30.5
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_delay(0, past, 0.5, 8) == 0.0
    far = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert retry_delay(0, far, 0.5, 8) == MAX_RETRY_AFTER_S


def test_retry_delay_unparseable_falls_back_to_backoff() -> None:
    for value in ("soon", "-1", "", None):
        for _ in range(50):
            assert 0 <= retry_delay(0, value, 0.5, 8) <= 0.5


def test_retry_delay_jitter_is_bounded_by_the_cap() -> None:
    for attempt in range(12):
        bound = min(8.0, 0.5 * 2**attempt)
        for _ in range(50):
            assert 0 <= retry_delay(attempt, None, 0.5, 8) <= bound
    assert all(0 <= retry_delay(30, None, 0.5, 8) <= 8.0 for _ in range(200))


def test_retry_delay_upper_bound_is_exactly_exponential_then_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openai_module.random, "uniform", lambda lo, hi: hi)
    assert [retry_delay(a, None, 0.5, 3.0) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    monkeypatch.setattr(openai_module.random, "uniform", lambda lo, hi: lo)
    assert retry_delay(4, None, 0.5, 3.0) == 0


# --- connection errors, malformed bodies, timeouts, secrets ------------------------------


async def test_connection_refused_names_the_endpoint(make_model: MakeModel) -> None:
    port = free_port()
    model = make_model(f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(ModelConnectionError) as info:
        await model.request(HELLO, [], ModelSettings())
    endpoint = f"POST http://127.0.0.1:{port}/v1/chat/completions"
    assert info.value.endpoint == endpoint
    assert endpoint in str(info.value)
    assert "failed after 2 tries" in str(info.value)


async def test_malformed_completion_is_a_model_response_error(make_model: MakeModel) -> None:
    async with FakeOpenAIServer(faults=[(200, {}, {"nope": 1})]) as server:
        model = make_model(server.base_url)
        with pytest.raises(ModelResponseError) as info:
            await model.request(HELLO, [], ModelSettings())
    assert "malformed completion" in str(info.value)
    assert info.value.endpoint == f"POST {server.base_url}/chat/completions"
    assert server.request_count == 1  # a malformed 200 is not retried


async def test_non_json_completion_is_a_model_response_error(make_model: MakeModel) -> None:
    fault = (200, {"Content-Type": "text/html"}, "<html>gateway</html>")
    async with FakeOpenAIServer(faults=[fault]) as server:
        model = make_model(server.base_url)
        with pytest.raises(ModelResponseError, match="malformed completion"):
            await model.request(HELLO, [], ModelSettings())


async def test_timeout_is_a_connection_error(make_model: MakeModel) -> None:
    async with FakeOpenAIServer(latency=5) as server:
        model = make_model(server.base_url, timeout_s=0.2, max_retries=0)
        started = time.monotonic()
        with pytest.raises(ModelConnectionError) as info:
            await model.request(HELLO, [], ModelSettings())
        elapsed = time.monotonic() - started
    assert "timed out" in str(info.value)
    assert "timed out after 0.2s" in str(info.value)
    assert "failed after 1 try" in str(info.value)
    assert elapsed < 5  # gave up long before the server answered


async def test_stream_timeout_is_a_connection_error(make_model: MakeModel) -> None:
    async with FakeOpenAIServer(latency=5) as server:
        model = make_model(server.base_url, timeout_s=0.2, max_retries=0)
        with pytest.raises(ModelConnectionError, match="timed out"):
            [item async for item in model.stream(HELLO, [], ModelSettings())]


async def test_api_key_never_appears_in_errors(make_model: MakeModel) -> None:
    async with FakeOpenAIServer(faults=[(401, {}, None)]) as server:
        model = make_model(server.base_url, api_key="sk-secret-123", max_retries=3)
        with pytest.raises(ModelHTTPError) as info:
            await model.request(HELLO, [], ModelSettings())
    exc = info.value
    assert exc.status == 401
    assert server.request_count == 1  # 401 is not retried
    for text in (str(exc), repr(exc), exc.endpoint, exc.body):
        assert "sk-secret" not in text
    assert "sk-secret" not in repr(server.requests)  # the key goes in a header, not the body


async def test_api_key_not_in_connection_errors(make_model: MakeModel) -> None:
    model = make_model(f"http://127.0.0.1:{free_port()}/v1", api_key="sk-secret-123", max_retries=0)
    with pytest.raises(ModelConnectionError) as info:
        await model.request(HELLO, [], ModelSettings())
    assert "sk-secret" not in str(info.value)
    assert "sk-secret" not in info.value.endpoint


async def test_model_is_reusable_after_aclose(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    await model.request(HELLO, [], ModelSettings())
    await model.aclose()
    await model.aclose()  # idempotent
    response = await model.request(HELLO, [], ModelSettings())
    assert response.message.content == "Echo: hello world"
    assert fake_openai.connections_accepted == 2


async def test_keep_alive_reuses_the_connection(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(fake_openai.base_url)
    for _ in range(3):
        await model.request(HELLO, [], ModelSettings())
    assert fake_openai.request_count == 3
    assert fake_openai.connections_accepted == 1


# --- resolve_model and settings -----------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> pytest.MonkeyPatch:
    """No OpenAI/Nimbus variables and no stray .env file influence Settings()."""
    for name in (
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "NIMBUS_OPENAI_BASE_URL",
        "NIMBUS_OPENAI_API_KEY",
        "NIMBUS_MODEL_MAX_RETRIES",
        "NIMBUS_MODEL_TIMEOUT_S",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


async def test_resolve_openai_with_base_url(clean_env: pytest.MonkeyPatch) -> None:
    model = resolve_model("openai:x", Settings(), base_url="http://127.0.0.1:9/v1")
    try:
        assert isinstance(model, OpenAIModel)
        assert model.model_name == "x"
        assert model.model_id == "openai:x"
        assert model.url == "http://127.0.0.1:9/v1/chat/completions"
    finally:
        await model.aclose()


@pytest.mark.parametrize(
    ("model_id", "base_url", "match"),
    [
        ("nope:x", None, "unknown model provider"),
        ("gpt-4o-mini", None, "provider:name"),
        ("openai:", None, "provider:name"),
        ("test:nope", None, "unknown test model"),
        ("local:smollm2", "http://127.0.0.1:9/v1", "base-url"),
        ("test:echo", "http://127.0.0.1:9/v1", "base-url"),
    ],
)
def test_resolve_model_config_errors(
    clean_env: pytest.MonkeyPatch, model_id: str, base_url: str | None, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_model(model_id, Settings(), base_url=base_url)


async def test_resolve_openai_bad_base_url_is_a_config_error(
    clean_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="http"):
        resolve_model("openai:x", Settings(), base_url="127.0.0.1:9")


async def test_openai_env_vars_are_honoured(
    clean_env: pytest.MonkeyPatch, fake_openai: FakeOpenAIServer
) -> None:
    clean_env.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    clean_env.setenv("OPENAI_API_KEY", "sk-from-env")
    clean_env.setenv("NIMBUS_MODEL_MAX_RETRIES", "5")
    clean_env.setenv("NIMBUS_MODEL_TIMEOUT_S", "7.5")
    settings = Settings()
    assert settings.openai_base_url == fake_openai.base_url
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-env"
    assert "sk-from-env" not in repr(settings)

    model = resolve_model(f"openai:{MODEL_ID}", settings)
    try:
        assert isinstance(model, OpenAIModel)
        assert model.url == f"{fake_openai.base_url}/chat/completions"
        assert model.max_retries == 5
        assert model.timeout_s == 7.5
        response = await model.request(HELLO, [], ModelSettings())
        assert response.message.content == "Echo: hello world"
    finally:
        await model.aclose()


async def test_api_key_from_env_is_sent_as_bearer_token(
    clean_env: pytest.MonkeyPatch, header_server: tuple[str, list[bytes]]
) -> None:
    base_url, heads = header_server
    clean_env.setenv("OPENAI_API_KEY", "sk-from-env")
    model = resolve_model("openai:x", Settings(), base_url=base_url)
    try:
        response = await model.request(HELLO, [], ModelSettings())
    finally:
        await model.aclose()
    assert response.message.content == "hi"
    assert response.usage.requests == 1  # "usage": null is tolerated
    [head] = heads
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer sk-from-env\r\n" in head
    assert b"\r\nContent-Type: application/json\r\n" in head


async def test_nimbus_openai_base_url_is_honoured_and_wins(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("NIMBUS_OPENAI_BASE_URL", "http://127.0.0.1:7001/v1")
    assert Settings().openai_base_url == "http://127.0.0.1:7001/v1"
    clean_env.setenv("OPENAI_BASE_URL", "http://127.0.0.1:7002/v1")
    settings = Settings()
    assert settings.openai_base_url == "http://127.0.0.1:7001/v1"  # the NIMBUS_ name wins
    model = resolve_model("openai:x", settings)
    try:
        assert isinstance(model, OpenAIModel)
        assert model.url == "http://127.0.0.1:7001/v1/chat/completions"
    finally:
        await model.aclose()


async def test_no_api_key_sends_no_authorization(
    clean_env: pytest.MonkeyPatch, header_server: tuple[str, list[bytes]]
) -> None:
    base_url, heads = header_server
    model = resolve_model("openai:x", Settings(), base_url=base_url)
    try:
        await model.request(HELLO, [], ModelSettings())
    finally:
        await model.aclose()
    [head] = heads
    assert b"authorization" not in head.lower()


def test_default_base_url_without_env(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().openai_base_url == "https://api.openai.com/v1"
