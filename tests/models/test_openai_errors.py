"""Retries, timeouts and errors of the openai: provider, against the fake server."""

from __future__ import annotations

import socket
import time

import pytest

from nimbus.core.messages import UserMessage
from nimbus.core.model import ModelSettings, ToolSpec
from nimbus.exceptions import (
    ConfigError,
    ModelConnectionError,
    ModelHTTPError,
    ModelResponseError,
)
from nimbus.models.openai import OpenAIModel, retry_delay
from nimbus.testing.fake_openai import FakeOpenAIServer

HELLO = [UserMessage("hello")]
SETTINGS = ModelSettings()


def model_for(server: FakeOpenAIServer, **kwargs: object) -> OpenAIModel:
    options: dict = {"backoff_base_s": 0.001, "backoff_max_s": 0.01, **kwargs}
    return OpenAIModel("fake-model", base_url=server.base_url, **options)


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
