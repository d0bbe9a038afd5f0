"""Shapes of the OpenAI-compatible facade (``/v1``): request bodies, conversion of OpenAI chat
messages to a run's input, the ``chat.completion`` objects, and errors as OpenAI error bodies.

The routes live in :mod:`nimbus.adapters.api.routes.openai`; this module holds no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any, Literal

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from nimbus.adapters.api.errors import APIError
from nimbus.exceptions import ThreadBusy, UserError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}
TEXT_PARTS = {"text", "input_text", "output_text", "refusal"}


# --- errors --------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error answered as an OpenAI error body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    @property
    def type(self) -> str:
        """The OpenAI error type of the status."""
        if self.status >= 500:
            return "server_error"
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return JSONResponse(self.body(), self.status, headers=self.headers)


def as_openai_error(exc: Exception) -> OpenAIError | None:
    """The OpenAI error for an exception the app maps to HTTP; None for any other."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, APIError):
        code = "invalid_api_key" if exc.status == 401 else None
        return OpenAIError(exc.status, exc.message, code=code, headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        problems = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "json_invalid":  # its loc is a character position
                problems.append(("", f"the body is not valid JSON ({msg})"))
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append((loc, msg))
        summary = "; ".join(f"{loc or 'body'}: {msg}" for loc, msg in problems[:5])
        first = problems[0][0] if problems else ""
        return OpenAIError(400, f"invalid request: {summary}", param=first or None)
    if isinstance(exc, StarletteHTTPException):
        headers = dict(exc.headers) if exc.headers else None
        return OpenAIError(exc.status_code, str(exc.detail), headers=headers)
    if isinstance(exc, UserError):  # ConfigError included: a bad setting or message
        return OpenAIError(400, str(exc))
    if isinstance(exc, ThreadBusy):
        return OpenAIError(409, f"thread {exc.args[0]!r} is busy with another run")
    return None


class OpenAIRoute(APIRoute):
    """A route whose errors, authentication and body validation included, are OpenAI error
    bodies rather than the app's ``{"detail": ...}`` problems."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, with errors mapped to OpenAI error responses."""
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                error = as_openai_error(exc)
                if error is None:
                    raise
                return error.response()

        return handle


# --- requests ------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # newer clients' extra fields keep working


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=200)
    arguments: str = "{}"


class ToolCall(_Body):
    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    """One message of an OpenAI chat conversation (text content only)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type")
            if not isinstance(kind, str) or kind not in TEXT_PARTS:
                raise ValueError(f"only text content parts are supported, not {kind!r}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """``POST /v1/chat/completions``; sampling fields Nimbus has no use for are ignored."""

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_client_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError(
                "client-side tools are not supported: the assistant's own tools run in Nimbus"
            )
        return value

    def run_input(self) -> dict[str, Any]:
        """The run's input: the conversation as Nimbus messages (system ones kept)."""
        return {"messages": [_message(m) for m in self.messages]}

    def run_config(self) -> dict[str, Any] | None:
        """Run config for the sampling settings given, or None."""
        settings: dict[str, Any] = {}
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            settings["max_tokens"] = max_tokens
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        return {"configurable": settings} if settings else None


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": _text(m.content)}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
        out["name"] = m.name or ""
    return out


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(p.get("text") or p.get("refusal") or "") for p in content)


# --- responses -----------------------------------------------------------------------


def unix(value: Any) -> int:
    """Seconds since the epoch of a stored timestamp (now when it has none)."""
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, str):
        return int(datetime.fromisoformat(value).timestamp())
    return int(time.time())


def model_object(assistant: Mapping[str, Any]) -> dict[str, Any]:
    """An assistant as an OpenAI model."""
    return {
        "id": assistant["assistant_id"],
        "object": "model",
        "created": unix(assistant.get("created_at")),
        "owned_by": "nimbus",
        "name": assistant.get("name") or assistant["assistant_id"],
    }


def usage_of(run: Mapping[str, Any]) -> dict[str, int]:
    """Token usage summed over a finished run's model calls, as OpenAI reports it."""
    usage = (run.get("state") or {}).get("usage") or {}
    prompt, completion = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(
    run: Mapping[str, Any], model: str, content: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A ``chat.completion`` object for a finished run."""
    return {
        "id": f"chatcmpl-{run['run_id']}",
        "object": "chat.completion",
        "created": unix(run.get("created_at")),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage,
        "system_fingerprint": None,
    }


def chunk(
    run: Mapping[str, Any],
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage chunk (no choices)."""
    out: dict[str, Any] = {
        "id": f"chatcmpl-{run['run_id']}",
        "object": "chat.completion.chunk",
        "created": unix(run.get("created_at")),
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def run_failed(run: Mapping[str, Any]) -> OpenAIError:
    """The 502 for a run that did not succeed."""
    reason = run.get("error") or f"the run ended {run.get('status')}"
    return OpenAIError(502, f"upstream model failed: {reason}", code="upstream_model_failed")
