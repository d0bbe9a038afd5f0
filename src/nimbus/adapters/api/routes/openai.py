"""/v1: the OpenAI-compatible facade. The tenant's assistants are its models; a chat completion
is a stateless run of the assistant on the conversation given, its tool calls made in Nimbus,
so an OpenAI client sees only the final answer (streamed token by token if it asks)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from nimbus.adapters.api.deps import Caller, Services, Svc
from nimbus.adapters.api.openai_facade import (
    ChatCompletionRequest,
    OpenAIError,
    OpenAIRoute,
    chunk,
    completion,
    model_object,
    run_failed,
    usage_of,
)
from nimbus.adapters.api.run_requests import create_run
from nimbus.adapters.api.schemas import RunCreate, StreamMode
from nimbus.adapters.store.keys import Principal
from nimbus.records import Assistant
from nimbus.service.executor import final_answer

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
ENDPOINTS = {"/v1/models", "/v1/chat/completions"}  # for 405s from the catch-all route


async def _assistant(svc: Services, caller: Principal, model: str) -> Assistant:
    found = await svc.db.assistants.find(caller.tenant_id, model)
    if found is None:
        raise OpenAIError(404, f"model {model!r} not found", code="model_not_found", param="model")
    return found


@router.get("/models")
async def list_models(svc: Svc, caller: Caller) -> dict[str, Any]:
    """The tenant's assistants as models, newest first."""
    rows = await svc.db.assistants.search(caller.tenant_id, limit=1000)
    return {"object": "list", "data": [model_object(a) for a in rows]}


@router.get("/models/{model:path}")
async def get_model(model: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """One assistant, by id or name, as a model."""
    return model_object(await _assistant(svc, caller, model))


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, svc: Svc, caller: Caller
) -> dict[str, Any] | StreamingResponse:
    """Run the assistant named by ``model`` on ``messages``; a completion, or its chunks (SSE)."""
    assistant = await _assistant(svc, caller, body.model)
    modes: list[StreamMode] = ["messages-tuple"] if body.stream else ["values"]
    request = RunCreate(
        assistant_id=assistant["assistant_id"],
        input=body.run_input(),
        config=body.run_config(),
        stream_mode=modes,
        on_completion="delete",
    )
    run = (await create_run(svc, caller, None, request, assistant=assistant)).run
    text: RunText | None = None
    handed_over = ended = False
    try:
        if not body.stream:
            final = await svc.runs.wait(run)
            ended = True
            return await _complete(svc, final, body.model)
        text = RunText(svc, run)
        # Wait for the first token, so that a run failing before it is a 502, not a 200.
        first = await anext(text.deltas, None)
        if first is None and text.final is not None and text.final["status"] != "success":
            raise run_failed(text.final)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _chunks(svc, run, text, first, body.model, include_usage)
        handed_over = True
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    finally:
        if not handed_over:
            await _discard(svc, run, text, ended or (text is not None and text.final is not None))


async def _complete(svc: Services, final: dict[str, Any], model: str) -> dict[str, Any]:
    """The completion of a run that ended (``final``: its row)."""
    if final["status"] != "success":
        raise run_failed(final)
    thread = await svc.db.threads.get(final["tenant_id"], final["thread_id"])
    answer = final_answer(thread["values"] if thread else {})
    return completion(final, model, answer.content if answer else "", usage_of(final))


class RunText:
    """The text deltas of a run's AI messages, as the run produces them; ``final`` is the run
    as stored once they are exhausted.

    Text a model writes before asking for tools is streamed too (it cannot be known to precede
    a tool call until the call comes); the tool calls and their results are not.
    """

    def __init__(self, svc: Services, run: Mapping[str, Any]) -> None:
        self.svc, self.run = svc, run
        self.final: dict[str, Any] | None = None
        self.deltas: AsyncGenerator[str, None] = self._deltas()

    async def _deltas(self) -> AsyncGenerator[str, None]:
        async for event in self.svc.runs.events(self.run["run_id"], -1):
            if event is None:
                continue
            _, name, data = event
            if name != "messages" or not isinstance(data, list) or not data:
                continue
            message = data[0]
            content = message.get("content") if isinstance(message, dict) else None
            if message.get("type") == "AIMessageChunk" and isinstance(content, str) and content:
                yield content
        self.final = await self.svc.runs.wait(self.run)


def _data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _chunks(
    svc: Services,
    run: Mapping[str, Any],
    text: RunText,
    first: str | None,
    model: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body: a role chunk, a chunk per text delta, the stop chunk, usage, ``[DONE]``."""
    done = False
    try:
        yield _data(chunk(run, model, {"role": "assistant", "content": "", "refusal": None}))
        if first is not None:
            yield _data(chunk(run, model, {"content": first}))
        async for delta in text.deltas:
            yield _data(chunk(run, model, {"content": delta}))
        final = text.final or run
        # before the client hears the end: nothing is left over
        await _discard(svc, run, text, text.final is not None)
        done = True
        if final["status"] != "success":
            # Headers are sent; the OpenAI clients raise on an error object in the stream.
            yield _data(run_failed(final).body())
            return
        yield _data(chunk(run, model, {}, "stop"))
        if include_usage:
            yield _data(chunk(run, model, None, usage=usage_of(final)))
        yield b"data: [DONE]\n\n"
    finally:
        if not done:  # the client went away: stop the run, nobody will read it
            await _discard(svc, run, text)


async def _discard(
    svc: Services, run: Mapping[str, Any], text: RunText | None, ended: bool = False
) -> None:
    """Stop the run if still active, wait for it to end, delete its temporary thread.
    ``ended``: the run is known to have ended (its row was read since): only the thread."""
    with anyio.CancelScope(shield=True):  # also when the request itself is being cancelled
        if text is not None:
            await text.deltas.aclose()
        await svc.runs.discard(run, ended)


@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def unknown_endpoint(path: str, request: Request) -> Response:
    """Any other /v1 path or method: an OpenAI-style 404 or 405."""
    if request.url.path.rstrip("/") in ENDPOINTS:
        raise OpenAIError(405, f"{request.method} is not allowed on {request.url.path}")
    raise OpenAIError(404, f"unknown endpoint {request.method} /v1/{path}", code="unknown_url")
