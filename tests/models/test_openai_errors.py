"""Retries, timeouts and errors of the openai: provider, against the fake server."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from nimbus.adapters.llm import resolve_model
from nimbus.adapters.llm.openai import OpenAIModel, retry_delay
from nimbus.core.messages import UserMessage
from nimbus.core.model import ModelResponse, ModelSettings, ToolSpec
from nimbus.exceptions import (
    ConfigError,
    ModelConnectionError,
    ModelError,
    ModelHTTPError,
    ModelResponseError,
)
from nimbus.settings import Settings
from nimbus.testing.fake_openai import ECHO_REQUEST, FakeOpenAIServer

HELLO = [UserMessage("hello")]
SETTINGS = ModelSettings()


def model_for(server: FakeOpenAIServer, **kwargs: object) -> OpenAIModel:
    return model_for_url(server.base_url, **kwargs)


def model_for_url(base_url: str, **kwargs: object) -> OpenAIModel:
    options: dict = {"backoff_base_s": 0.001, "backoff_max_s": 0.01, **kwargs}
    return OpenAIModel("fake-model", base_url=base_url, **options)


async def call(model: OpenAIModel, stream: bool) -> ModelResponse:
    """One completion, streamed or not."""
    if not stream:
        return await model.request(HELLO, [], SETTINGS)
    items = [i async for i in model.stream(HELLO, [], SETTINGS)]
    assert isinstance(items[-1], ModelResponse)
    return items[-1]


async def test_retries_429_and_5xx_then_succeeds() -> None:
    faults = [(429, {"Retry-After": "0"}, None), (503, {}, None)]
    async with FakeOpenAIServer(faults=faults) as server:
        model = model_for(server, max_retries=2)
        try:
            response = await model.request(HELLO, [], SETTINGS)
        finally:
            await model.aclose()
    assert response.message.content == "Echo: hello"
    assert server.request_count == 3


async def test_retry_after_is_honoured() -> None:
    async with FakeOpenAIServer(faults=[(429, {"Retry-After": "0.3"}, None)]) as server:
        model = model_for(server, max_retries=1)
        t0 = time.monotonic()
        try:
            await model.request(HELLO, [], SETTINGS)
        finally:
            await model.aclose()
        assert time.monotonic() - t0 >= 0.3  # a lower bound only: safe on a slow machine
    assert server.request_count == 2


async def test_other_4xx_is_not_retried_and_names_the_endpoint() -> None:
    body = {"error": {"message": "model 'x' does not exist", "type": "invalid_request_error"}}
    async with FakeOpenAIServer(faults=[(400, {}, body)]) as server:
        model = model_for(server, max_retries=3, api_key="sk-secret-123")
        try:
            with pytest.raises(ModelHTTPError) as info:
                await model.request(HELLO, [], SETTINGS)
        finally:
            await model.aclose()
    assert server.request_count == 1
    assert info.value.status == 400
    message = str(info.value)
    assert f"POST {server.base_url}/chat/completions answered 400" in message
    assert "model 'x' does not exist" in message
    assert "sk-secret" not in message


async def test_retries_are_bounded() -> None:
    async with FakeOpenAIServer(faults=[(500, {}, None)] * 3) as server:
        model = model_for(server, max_retries=1)
        try:
            with pytest.raises(ModelHTTPError) as info:
                await model.request(HELLO, [], SETTINGS)
        finally:
            await model.aclose()
    assert info.value.status == 500
    assert server.request_count == 2


async def test_connection_refused_names_the_endpoint() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    model = OpenAIModel(
        "m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base_s=0.001
    )
    with pytest.raises(ModelConnectionError) as info:
        await model.request(HELLO, [], SETTINGS)
    assert f"POST http://127.0.0.1:{port}/v1/chat/completions failed after 2 tries" in str(
        info.value
    )


async def test_timeout() -> None:
    async with FakeOpenAIServer(latency=30) as server:
        model = model_for(server, max_retries=0, timeout_s=0.2)
        try:
            with pytest.raises(ModelConnectionError, match=r"timed out after 0\.2s"):
                await model.request(HELLO, [], SETTINGS)
        finally:
            await model.aclose()


async def test_malformed_completion() -> None:
    async with FakeOpenAIServer(faults=[(200, {}, {"nope": 1})]) as server:
        model = model_for(server)
        try:
            with pytest.raises(ModelResponseError, match="malformed completion"):
                await model.request(HELLO, [], SETTINGS)
        finally:
            await model.aclose()


async def test_streamed_tool_call_and_usage() -> None:
    tool = ToolSpec(
        "lookup", "Look up", {"type": "object", "properties": {"q": {"type": "string"}}}
    )
    async with FakeOpenAIServer(tool_arguments='{"q": "paris weather"}') as server:
        model = model_for(server)
        try:
            items = [i async for i in model.stream(HELLO, [tool], ModelSettings(max_tokens=50))]
        finally:
            await model.aclose()
    response = items[-1]
    [call] = response.message.tool_calls  # type: ignore[union-attr]
    assert (call.name, call.arguments) == ("lookup", '{"q": "paris weather"}')
    assert response.usage.input_tokens > 0  # type: ignore[union-attr]
    sent = server.requests[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 50
    assert sent["tools"][0]["function"]["name"] == "lookup"


def test_retry_delay() -> None:
    assert retry_delay(0, "2", 0.5, 8) == 2.0
    assert retry_delay(5, "1000", 0.5, 8) == 60.0  # capped
    assert 0 <= retry_delay(3, None, 0.5, 8) <= 4.0  # full jitter, exponential bound
    assert 0 <= retry_delay(10, None, 0.5, 8) <= 8.0
    assert retry_delay(0, "Wed, 21 Oct 2015 07:28:00 GMT", 0.5, 8) == 0.0  # a date in the past
    assert 0 <= retry_delay(0, "soon", 0.5, 8) <= 0.5  # unparseable: plain backoff


def test_bad_base_url() -> None:
    with pytest.raises(ConfigError, match="http"):
        OpenAIModel("m", base_url="localhost:8000")


async def test_stream_that_is_not_an_event_stream_is_an_error() -> None:
    async with FakeOpenAIServer(faults=[(200, {}, {"nope": 1})]) as server:
        model = model_for(server)
        try:
            with pytest.raises(ModelResponseError, match="ended the stream"):
                _ = [i async for i in model.stream(HELLO, [], SETTINGS)]
        finally:
            await model.aclose()


# --- the operator's secrets never reach an error --------------------------------------------

KEY = "sk-operator-secret-" + "0123456789abcdef" * 2
USER, PASSWORD, QUERY_SECRET = "nimbus-user", "pw-secret-123", "qsecret-456"


def secret_url(port: int) -> str:
    """A base URL with credentials and an Azure-style key in the query."""
    return f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/v1?api-key={QUERY_SECRET}"


def leaks(text: str) -> list[str]:
    """The secrets ``text`` shows: the URL's, or the key whole or by any 8 characters of it."""
    parts = [USER, PASSWORD, QUERY_SECRET, *(KEY[i : i + 8] for i in range(len(KEY) - 7))]
    return [s for s in parts if s in text]


def assert_redacted(exc: ModelError, port: int) -> None:
    assert exc.endpoint == f"POST http://127.0.0.1:{port}/v1/chat/completions?api-key=***"
    body = exc.body if isinstance(exc, ModelHTTPError) else ""
    for text in (str(exc), repr(exc), exc.endpoint, body):
        assert leaks(text) == [], text
    assert str(exc).startswith(exc.endpoint)


@pytest.mark.parametrize("status", [401, 500])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_echoing_the_request_shows_no_secret(status: int, stream: bool) -> None:
    async with FakeOpenAIServer(faults=[(status, {}, ECHO_REQUEST)]) as server:
        model = model_for_url(secret_url(server.port), api_key=KEY, max_retries=0)
        try:
            with pytest.raises(ModelHTTPError) as info:
                await call(model, stream)
        finally:
            await model.aclose()
    assert info.value.status == status
    assert_redacted(info.value, server.port)
    message = str(info.value)
    assert f"answered {status}: Injected fault {status}; the request was: POST" in message
    assert "Authorization: ***" in message  # the echo was there, and lost the key
    assert "api-key=***" in message  # the request line too


UPSTREAM_BODIES = [
    # an OpenAI error naming the key, whole and URL-encoded
    (401, {}, {"error": {"message": f"Incorrect API key provided: {KEY} ({quote(KEY)})."}}),
    # OpenAI's own hint: the key in part
    (401, {}, {"error": {"message": f"Incorrect API key: {KEY[:12]}****{KEY[-4:]}."}}),
    # a proxy dumping what it received, as JSON but not an OpenAI error
    (502, {}, {"headers": {"authorization": f"Bearer {KEY}", "api-key": QUERY_SECRET}}),
    # and as text
    (
        500,
        {"Content-Type": "text/plain"},
        f"upstream failed for {USER}:{PASSWORD} Authorization: Bearer {KEY}\napi-key: x",
    ),
]


@pytest.mark.parametrize("fault", UPSTREAM_BODIES)
async def test_upstream_bodies_lose_the_secrets_and_keep_the_rest(fault: tuple) -> None:  # type: ignore[type-arg]
    async with FakeOpenAIServer(faults=[fault]) as server:
        model = model_for_url(secret_url(server.port), api_key=KEY, max_retries=0)
        try:
            with pytest.raises(ModelHTTPError) as info:
                await model.request(HELLO, [], SETTINGS)
        finally:
            await model.aclose()
    assert_redacted(info.value, server.port)
    assert f"answered {fault[0]}: " in str(info.value)
    assert "***" in info.value.body


async def test_a_mid_stream_error_shows_no_secret() -> None:
    error = {"message": f"overloaded; request had Authorization: Bearer {KEY}", "code": 503}
    events = [
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"error": error},
    ]
    body = "".join(f"data: {orjson.dumps(e).decode()}\n\n" for e in events)
    fault = (200, {"Content-Type": "text/event-stream"}, body)
    async with FakeOpenAIServer(faults=[fault]) as server:
        model = model_for_url(secret_url(server.port), api_key=KEY)
        try:
            with pytest.raises(ModelHTTPError) as info:
                _ = [i async for i in model.stream(HELLO, [], SETTINGS)]
        finally:
            await model.aclose()
    assert_redacted(info.value, server.port)
    assert "reported an error mid-stream: overloaded; request had Authorization: ***" in str(
        info.value
    )


async def test_a_connection_failure_shows_no_secret() -> None:
    with socket.socket() as sock:  # a free port, left closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = model_for_url(secret_url(port), api_key=KEY, max_retries=1)
    with pytest.raises(ModelConnectionError) as info:
        await model.request(HELLO, [], SETTINGS)
    assert_redacted(info.value, port)
    assert "failed after 2 tries: cannot connect" in str(info.value)


def test_a_bad_base_url_is_not_shown_whole() -> None:
    with pytest.raises(ConfigError) as info:
        OpenAIModel("m", base_url=f"http://{USER}:{PASSWORD}@127.0.0.1:99999/v1?api-key=q123")
    assert leaks(str(info.value)) == [] and "q123" not in str(info.value)
    assert "http://127.0.0.1:99999/v1?api-key=***" in str(info.value)


# --- the response-size cap -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_response_over_the_limit_fails_clearly(stream: bool) -> None:
    words = " ".join(["word"] * 5000)  # 25 kB of text
    completion = {"choices": [{"message": {"content": words}, "finish_reason": "stop"}]}
    chunk = {"choices": [{"index": 0, "delta": {"content": words}}]}
    body: object = completion
    headers: dict[str, str] = {}
    if stream:
        body = f"data: {orjson.dumps(chunk).decode()}\n\n"
        headers = {"Content-Type": "text/event-stream"}
    async with FakeOpenAIServer(faults=[(200, headers, body)]) as server:
        model = model_for(server, max_response_bytes=16 * 1024, max_retries=2)
        try:
            with pytest.raises(ModelResponseError) as info:
                await call(model, stream)
            assert "answered more than 16384 bytes" in str(info.value)
            assert "NIMBUS_MODEL_MAX_RESPONSE_BYTES" in str(info.value)
            assert server.request_count == 1  # not retried: it would be as large again
            answer = await model.request(HELLO, [], SETTINGS)  # a new connection works
        finally:
            await model.aclose()
    assert answer.message.content == "Echo: hello"
    assert server.connections_accepted == 2  # the oversized one was closed


def test_the_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("NIMBUS_MODEL_MAX_RESPONSE_BYTES", "65536")
    model = resolve_model("openai:m", Settings(), base_url="http://127.0.0.1:9/v1")
    assert isinstance(model, OpenAIModel)
    assert model.max_response_bytes == 65536
    assert Settings.model_fields["model_max_response_bytes"].default == 16 * 1024 * 1024
