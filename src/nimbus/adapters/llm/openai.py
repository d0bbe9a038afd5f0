"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server,
LM Studio …), as ``openai:<model>``.

This is the hot path of every run, so it speaks HTTP through
:mod:`nimbus.adapters.llm.http` (asyncio
+ llhttp) and JSON through orjson, chosen by ``nimbus bench runtime``: see docs/benchmarks.md.

Its errors are read by tenants (stored in runs, streamed, answered by the OpenAI facade) while
the endpoint is the operator's: every error is built by :meth:`OpenAIModel._error`, which
passes it through :mod:`nimbus.adapters.llm.redact` (no credentials, query values, API key or
key-shaped strings), and shows only the start of what the endpoint said.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson

from nimbus.adapters.llm.http import (
    DEFAULT_MAX_RESPONSE_BYTES,
    HTTPError,
    HTTPPool,
    Response,
    ResponseTooLarge,
)
from nimbus.adapters.llm.redact import Redactor, excerpt, redact_url, url_secrets
from nimbus.core.messages import (
    AssistantMessage,
    Message,
    SystemMessage,
    ToolCall,
    ToolResultMessage,
    Usage,
    UserMessage,
)
from nimbus.core.model import Model, ModelResponse, ModelSettings, TextDelta, ToolSpec
from nimbus.exceptions import (
    ConfigError,
    ModelConnectionError,
    ModelError,
    ModelHTTPError,
    ModelResponseError,
)

#: Statuses worth another try: timeouts, conflicts, rate limits and server errors.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})

#: Of what an endpoint says in an error: how much is redacted, and how much of that is shown.
ERROR_SCANNED_CHARS = 4096
ERROR_SHOWN_CHARS = 300

_E = TypeVar("_E", bound=ModelError)


def to_wire(message: Message) -> dict[str, Any]:
    """One message in the chat-completions wire format."""
    if isinstance(message, UserMessage):
        return {"role": "user", "content": message.content}
    if isinstance(message, AssistantMessage):
        out: dict[str, Any] = {"role": "assistant", "content": message.content or None}
        if message.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in message.tool_calls
            ]
        return out
    if isinstance(message, ToolResultMessage):
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": message.content}
    raise TypeError(f"not a message: {message!r}")


def tool_to_wire(spec: ToolSpec) -> dict[str, Any]:
    """A tool spec in the chat-completions wire format."""
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": spec.parameters or {"type": "object", "properties": {}},
        },
    }


def chat_request(
    model_name: str,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec],
    settings: ModelSettings,
    stream: bool = False,
) -> bytes:
    """The JSON body of a chat-completions request."""
    body: dict[str, Any] = {
        "model": model_name,
        "messages": [to_wire(m) for m in messages],
    }
    if tools:
        body["tools"] = [tool_to_wire(t) for t in tools]
    if settings.max_tokens is not None:
        body["max_tokens"] = settings.max_tokens
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


#: The longest ``Retry-After`` honoured; a server asking for more gets this.
MAX_RETRY_AFTER_S = 60.0


def retry_delay(attempt: int, retry_after: str | None, base: float, cap: float) -> float:
    """Seconds to wait before try ``attempt + 1``: ``Retry-After`` (seconds or an HTTP date,
    up to :data:`MAX_RETRY_AFTER_S`) if given, else exponential backoff with full jitter."""
    if retry_after:
        try:
            seconds = float(retry_after)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = -1.0
        if seconds >= 0 or "," in retry_after:
            return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return random.uniform(0, min(cap, base * (2**attempt)))


def _error_message(error: Any) -> str:
    """The message of an OpenAI error object (``{"message": ...}``), else the whole of it."""
    message = error.get("message") if isinstance(error, dict) else error
    if isinstance(message, str) and message:
        return message
    return orjson.dumps(error).decode() if error is not None else ""


def _error_detail(body: bytes) -> str:
    """What an error body says: its OpenAI error message, else its text (not yet redacted)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = data["error"].get("message")
        if isinstance(message, str) and message:
            return message
    # 4 bytes a character at most: enough to fill what is scanned
    text = body[: ERROR_SCANNED_CHARS * 4].decode("utf-8", "replace").strip()
    return text or "(empty body)"


def _usage(data: Any) -> Usage:
    if not isinstance(data, dict):
        return Usage(requests=1)
    return Usage(int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0), 1)


class OpenAIModel(Model):
    """A chat-completions endpoint; retries with backoff and jitter, honours ``Retry-After``."""

    def __init__(
        self,
        model_name: str,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 2,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_connections: int = 1000,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        parts = urlsplit(base_url)
        try:
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # raises ValueError for a port that is not a number or too large
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(
                f"model base URL must be an http(s) URL, got {redact_url(base_url)!r}"
            )
        self.model_name = model_name
        self.model_id = f"openai:{model_name}"
        path = parts.path.rstrip("/") + "/chat/completions"
        self.path = f"{path}?{parts.query}" if parts.query else path
        #: The endpoint's URL as shown in errors and logs: no credentials, query values ***.
        self.url = redact_url(urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")))
        self.endpoint = f"POST {self.url}"
        self._redact = Redactor([api_key, *url_secrets(base_url)])
        headers = "Content-Type: application/json\r\nAccept: application/json\r\n"
        if api_key:
            headers += f"Authorization: Bearer {api_key}\r\n"
        self._headers = headers.encode("latin-1")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self._pool: HTTPPool | None = None

    def _client(self) -> HTTPPool:
        if self._pool is None:
            self._pool = HTTPPool(
                self.url,  # the pool needs only its scheme, host and port
                max_connections=self.max_connections,
                connect_timeout_s=self.connect_timeout_s,
                max_response_bytes=self.max_response_bytes,
            )
        return self._pool

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._pool is not None:
            await self._pool.close()
        self._pool = None

    def _body(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        settings: ModelSettings,
        stream: bool,
    ) -> bytes:
        return chat_request(self.model_name, messages, tools, settings, stream)

    def _error(self, kind: type[_E], message: str, **fields: Any) -> _E:
        """An error of ``kind`` about this endpoint; ``message`` is redacted."""
        return kind(self._redact(message), endpoint=self.endpoint, **fields)

    def _shown(self, text: str) -> str:
        """The start of ``text`` from the endpoint (or about it), redacted, to put in an error."""
        return excerpt(self._redact(excerpt(text, ERROR_SCANNED_CHARS)), ERROR_SHOWN_CHARS)

    def _too_large(self) -> ModelResponseError:
        return self._error(
            ModelResponseError,
            f"{self.endpoint} answered more than {self.max_response_bytes} bytes "
            "(the limit is NIMBUS_MODEL_MAX_RESPONSE_BYTES); the response was dropped",
        )

    def _connection_error(self, tries: int, exc: BaseException) -> ModelConnectionError:
        reason = (
            f"timed out after {self.timeout_s:g}s" if isinstance(exc, TimeoutError) else str(exc)
        )
        return self._error(
            ModelConnectionError,
            f"{self.endpoint} failed after {tries} {'try' if tries == 1 else 'tries'}: "
            f"{self._shown(reason or type(exc).__name__)}",
        )

    async def _post(
        self, body: bytes, *, stream: bool
    ) -> tuple[Response, AsyncIterator[bytes] | None]:
        """POST with retries; returns a 200 response (and its body chunks when streaming)."""
        pool = self._client()
        attempt = 0
        while True:
            retry_after: str | None = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    if stream:
                        resp, chunks = await pool.post_stream(self.path, self._headers, body)
                        if resp.status != 200:
                            resp.body = b"".join([c async for c in chunks])
                    else:
                        resp, chunks = await pool.post(self.path, self._headers, body), None
            except ResponseTooLarge:
                raise self._too_large() from None  # not retried: it would be as large again
            except (HTTPError, TimeoutError) as exc:
                if attempt >= self.max_retries:
                    raise self._connection_error(attempt + 1, exc) from None
            else:
                if resp.status == 200:
                    return resp, chunks
                if resp.status not in RETRYABLE_STATUSES or attempt >= self.max_retries:
                    detail = self._shown(_error_detail(resp.body))
                    raise self._error(
                        ModelHTTPError,
                        f"{self.endpoint} answered {resp.status}: {detail}",
                        status=resp.status,
                        body=detail,
                    )
                retry_after = resp.headers.get("retry-after")
            await asyncio.sleep(
                retry_delay(attempt, retry_after, self.backoff_base_s, self.backoff_max_s)
            )
            attempt += 1

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> ModelResponse:
        """One non-streamed chat completion."""
        resp, _ = await self._post(
            self._body(messages, tools, settings, stream=False), stream=False
        )
        try:
            data = orjson.loads(resp.body)
            choice = data["choices"][0]
            msg = choice["message"]
            calls = [
                ToolCall(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}")
                for c in msg.get("tool_calls") or ()
            ]
            message = AssistantMessage(msg.get("content") or "", calls)
            return ModelResponse(
                message,
                _usage(data.get("usage")),
                data.get("model", ""),
                choice.get("finish_reason"),
            )
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise self._error(
                ModelResponseError,
                f"{self.endpoint} returned a malformed completion "
                f"({type(exc).__name__}: {self._shown(str(exc))})",
            ) from None

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ModelResponse]:
        """A streamed chat completion: text deltas as they arrive, then the whole response."""
        _, chunks = await self._post(
            self._body(messages, tools, settings, stream=True), stream=True
        )
        assert chunks is not None
        text: list[str] = []
        calls: dict[int, list[str]] = {}
        usage = Usage(requests=1)
        finish_reason: str | None = None
        model_name = ""
        done = False
        try:
            async for line in _sse_data(chunks, self.timeout_s):
                if line == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(line)
                if chunk.get("error"):
                    detail = self._shown(_error_message(chunk["error"]))
                    raise self._error(
                        ModelHTTPError,
                        f"{self.endpoint} reported an error mid-stream: {detail}",
                        status=200,
                        body=detail,
                    )
                model_name = chunk.get("model") or model_name
                if chunk.get("usage"):
                    usage = _usage(chunk["usage"])
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        text.append(delta["content"])
                        yield TextDelta(delta["content"])
                    for tc in delta.get("tool_calls") or ():
                        slot = calls.setdefault(int(tc.get("index", 0)), ["", "", ""])
                        fn = tc.get("function") or {}
                        slot[0] = tc.get("id") or slot[0]
                        slot[1] += fn.get("name") or ""
                        slot[2] += fn.get("arguments") or ""
                    finish_reason = choice.get("finish_reason") or finish_reason
        except ResponseTooLarge:
            raise self._too_large() from None
        except (HTTPError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else self._shown(str(exc))
            raise self._error(
                ModelConnectionError, f"{self.endpoint}: the stream broke: {reason}"
            ) from None
        except ModelError:
            raise
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            raise self._error(
                ModelResponseError,
                f"{self.endpoint} streamed a malformed chunk ({self._shown(str(exc))})",
            ) from None
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        if not done and finish_reason is None:
            raise self._error(
                ModelResponseError,
                f"{self.endpoint} ended the stream before the answer was complete",
            )
        tool_calls = [
            ToolCall(slot[0] or f"call_{i}", slot[1], slot[2] or "{}")
            for i, slot in sorted(calls.items())
        ]
        yield ModelResponse(
            AssistantMessage("".join(text), tool_calls), usage, model_name, finish_reason
        )


async def _sse_data(chunks: AsyncIterator[bytes], idle_timeout_s: float) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent event stream, one per line."""
    buffer = b""
    while True:
        async with asyncio.timeout(idle_timeout_s):
            chunk = await anext(chunks, None)
        if chunk is None:
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip()
