"""/threads/{id}/runs and stateless /runs: create, wait, stream, join, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nimbus.adapters.api.deps import Caller, Services, Svc
from nimbus.adapters.api.errors import APIError, not_found
from nimbus.adapters.api.routes.threads import get_thread
from nimbus.adapters.api.schemas import RunCreate, path_id
from nimbus.adapters.api.streams import TenantStreams
from nimbus.adapters.store.keys import Principal
from nimbus.adapters.store.runs import ACTIVE
from nimbus.records import Assistant, Queued
from nimbus.service.agents import GRAPHS
from nimbus.service.broker import StreamEvent
from nimbus.service.executor import stream_modes
from nimbus.service.langgraph import check_input, input_messages

router = APIRouter(tags=["runs"])

FIELDS = (
    "run_id",
    "thread_id",
    "assistant_id",
    "created_at",
    "updated_at",
    "status",
    "metadata",
    "multitask_strategy",
    "kwargs",
)
MAX_ID = 64  # the width of the id columns
IdemKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="The same key with the same request returns the same run (per tenant).",
    ),
]
HEARTBEAT = b": heartbeat\n\n"  # an SSE comment: clients skip it
RunStatus = Literal["pending", "running", "error", "success", "timeout", "interrupted"]
MODE_OF_EVENT = {
    "values": "values",
    "updates": "updates",
    "messages": "messages-tuple",
    "messages/complete": "messages",
    "messages/partial": "messages",
    "messages/metadata": "messages",
    "events": "events",
    "debug": "debug",
}


def public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A run as the API shows it."""
    return {k: row.get(k) for k in FIELDS}


def run_path(run: Mapping[str, Any], stateless: bool) -> str:
    """Where a run can be read back."""
    if stateless:
        return f"/runs/{run['run_id']}"
    return f"/threads/{run['thread_id']}/runs/{run['run_id']}"


def request_hash(thread_id: str | None, body: RunCreate) -> str:
    """What an Idempotency-Key stands for: the thread and the whole request body."""
    request = {"thread_id": thread_id, "body": body.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


async def create_run(
    svc: Services,
    caller: Principal,
    thread_id: str | None,
    body: RunCreate,
    default_modes: Any = None,
    idempotency_key: str | None = None,
    assistant: Assistant | None = None,
) -> Queued:
    """Validate and queue a run; the worker pool picks it up. With an ``idempotency_key``
    used before for the same request, the run made then (``replayed``), queued once.
    ``assistant``: the run's assistant, when the caller has read it already."""
    if thread_id is not None and body.if_not_exists == "create":
        try:  # a thread made here must be addressable afterwards
            path_id(thread_id)
        except ValueError as exc:
            raise APIError(422, f"thread_id: {exc}") from None
    if thread_id is not None and len(thread_id) > MAX_ID:  # no such thread can be stored
        if body.if_not_exists == "create":
            raise APIError(422, f"thread_id longer than {MAX_ID} characters")
        raise not_found("thread", thread_id)
    check_input(input_messages(body.input))  # a bad input is a 422 now, not a failed run
    kwargs = {
        "input": body.input,
        "config": body.config,
        "context": body.context,
        "stream_mode": body.stream_mode if default_modes is None else default_modes,
        "command": body.command,
        "on_completion": body.on_completion,
        "durability": body.durability or svc.settings.durability,
    }
    # A free worker slot here: the run is claimed as it is queued, and starts at once.
    reserved = svc.pool.reserve(caller.tenant_id)
    try:
        queued: Queued | None = None
        if thread_id is not None and idempotency_key is None and not (body.config or body.context):
            # The usual run (an assistant by id, graph or name; a thread that exists; nothing
            # to validate against the assistant first): the assistant is read as the run is
            # queued.
            queued = await svc.db.runs.create_with_assistant(
                caller.tenant_id,
                thread_id=thread_id,
                assistant_id=body.assistant_id,
                kwargs=kwargs,
                metadata=body.metadata,
                multitask_strategy=body.multitask_strategy,
                claim_as=svc.pool.owner if reserved else None,
            )
            if queued is not None:
                assistant = queued.assistant
        if queued is None:
            assistant = await _assistant(svc, caller, body, assistant)
            queued = await svc.db.runs.create(
                caller.tenant_id,
                thread_id=thread_id,
                assistant_id=assistant["assistant_id"],
                kwargs=kwargs,
                metadata=body.metadata,
                multitask_strategy=body.multitask_strategy,
                if_not_exists=body.if_not_exists,
                temporary=thread_id is None,
                idempotency=(
                    (idempotency_key, request_hash(thread_id, body)) if idempotency_key else None
                ),
                claim_as=svc.pool.owner if reserved else None,
            )
    except BaseException:
        if reserved:
            svc.pool.release(caller.tenant_id)
        raise
    if queued is None or queued.replayed:
        if reserved:
            svc.pool.release(caller.tenant_id)
        if queued is None:
            raise not_found("thread", thread_id or "")
        return queued
    for interrupted in queued.interrupted:
        svc.pool.cancel_everywhere(interrupted)
    svc.pool.submit(queued, assistant, reserved=reserved)
    if queued.claimed:
        # It starts here now: let it send its first model request before this request goes
        # on to build its response, which the client waits the model's time for anyway.
        await asyncio.sleep(0)
    return queued


async def _assistant(
    svc: Services, caller: Principal, body: RunCreate, known: Assistant | None = None
) -> Assistant:
    """The run's assistant (``known``, or read: by id, graph or name; 404 if none), its
    settings checked with the run's own ``config`` and ``context`` (422)."""
    assistant = known or await svc.db.assistants.find(caller.tenant_id, body.assistant_id)
    if assistant is None and body.assistant_id in GRAPHS:
        assistant = await svc.db.assistants.ensure_system(caller.tenant_id, body.assistant_id)
    if not assistant:
        raise not_found("assistant", body.assistant_id)
    if body.config or body.context:
        svc.agents.validate(
            assistant["graph_id"],
            body.config,
            body.context,
            assistant=(assistant["config"], assistant["context"]),
        )
    return assistant


async def run_events(
    svc: Services, run_id: str, after: int, idle_s: float | None = None, fresh: bool = False
) -> AsyncIterator[StreamEvent | None]:
    """A run's events after ``after``: the stored ones, then live ones until it ends, from
    this process or, on PostgreSQL, from the worker executing it elsewhere; with ``idle_s``,
    ``None`` after each ``idle_s`` seconds without one.

    A ``fresh`` run (queued by this request) has no stored events yet; a run followed live to
    its end has had every event delivered: neither needs the database.
    """
    last = after
    if not (fresh and svc.broker.is_live(run_id)):
        for event in await svc.db.runs.events(run_id, after):
            last = event[0]
            yield event
    if svc.broker.is_live(run_id):
        async for live in svc.broker.subscribe(run_id, last, idle_s):
            if live is not None:
                last = live[0]
            yield live
        if not svc.pool.gone(run_id):
            return  # it ended here: every event was delivered
    if svc.follower is not None and not await svc.db.runs.ended(run_id):
        async for remote in svc.follower.follow(run_id, last, idle_s):
            yield remote
        return
    for event in await svc.db.runs.events(run_id, last):
        yield event


async def events(
    svc: Services, run_id: str, modes: set[str], after: int, fresh: bool = False
) -> AsyncIterator[bytes]:
    """SSE frames of a run (see :func:`run_events`), with heartbeats while it is quiet."""
    idle_s = svc.settings.sse_heartbeat_s or None
    async for event in run_events(svc, run_id, after, idle_s, fresh):
        if event is None:  # quiet for a while: keep proxies and clients from timing out
            yield HEARTBEAT
            continue
        seq, name, _ = event
        mode = MODE_OF_EVENT.get(name)
        if mode is None or mode in modes:
            data = svc.broker.encoded(run_id, event)
            yield b"event: %s\ndata: %s\nid: %d\n\n" % (name.encode(), data, seq)


def _sse(
    svc: Services,
    run: Mapping[str, Any],
    modes: set[str],
    after: int,
    location: str,
    cancel_on_disconnect: bool,
    resumable: bool = True,
    fresh: bool = False,
    stateless: bool = False,
) -> StreamingResponse:
    """The event stream of ``run``, on a stream slot its tenant holds (:class:`TenantStreams`:
    taken by the caller, given back here when the stream ends)."""

    async def body() -> AsyncIterator[bytes]:
        finished = False
        try:
            async for frame in events(svc, run["run_id"], modes, after, fresh):
                yield frame
            finished = True
            if stateless and not resumable:  # nobody can come back for it: clean up now
                await _finish_stateless(svc, run, ended=True)  # its events ended with it
        finally:
            if not finished and cancel_on_disconnect:
                # The client is gone and this task is being cancelled: without the shield the
                # first await below would be cancelled too, and the run would go on.
                with anyio.CancelScope(shield=True):
                    await svc.db.runs.cancel(run["tenant_id"], run["run_id"], None, "interrupt")
                svc.pool.cancel_everywhere(run["run_id"])

    headers = {"Content-Location": location, "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    if resumable:  # the client reconnects to Location with Last-Event-ID when the stream breaks
        headers["Location"] = f"{location}/stream"
    response = _EventStream(body(), media_type="text/event-stream", headers=headers)
    response.tenant_id, response.streams = run["tenant_id"], svc.streams
    return response


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its event generator, so the generator's
    clean-up runs when the client goes away, whether the server noticed the disconnect
    (the stream is cancelled) or a write failed (the generator would otherwise wait for GC);
    and gives its tenant's stream slot back however it ends (even before its generator ran,
    whose own clean-up would then never run)."""

    tenant_id: str
    streams: TenantStreams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.streams.give_back(self.tenant_id)

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


async def wait_for(svc: Services, run: Mapping[str, Any]) -> dict[str, Any]:
    """Wait for a run to end; returns it as stored."""
    done = svc.pool.done_event(run["run_id"])
    if done is not None:
        await done.wait()
    if done is None or done.outcome is None:  # it ran (or runs) elsewhere, or not at all
        if svc.follower is not None:
            # (``run`` may be the row as queued, pending, though the run has ended since)
            await svc.follower.wait(run["run_id"])
        else:
            while await svc.db.runs.status(run["run_id"]) in ACTIVE:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    final = await svc.db.runs.get(run["tenant_id"], run["run_id"])
    return final or dict(run)


async def _final_values(svc: Services, run: Mapping[str, Any]) -> dict[str, Any]:
    """The thread's values when the run ends (with ``__error__`` if it failed)."""
    done = svc.pool.done_event(run["run_id"])
    if done is not None:
        await done.wait()
    if done is not None and done.outcome is not None:  # ended here: no need to read it back
        status, error, values = done.outcome
    else:
        final = await wait_for(svc, run)
        thread = await svc.db.threads.get(run["tenant_id"], run["thread_id"])
        status, error = final["status"], final.get("error")
        values = thread["values"] if thread else {}
    values = dict(values)
    if status == "error":
        values["__error__"] = {"error": "RunError", "message": error or "the run failed"}
    return values


def _last_event_id(value: str | None) -> int:
    if not value:
        return -1
    try:
        return int(value)
    except ValueError:
        raise APIError(422, f"Last-Event-ID must be an event number, got {value!r}") from None


async def _finish_stateless(svc: Services, run: Mapping[str, Any], ended: bool = False) -> None:
    """Delete a stateless run's thread (unless kept) once the run is over (``ended``: it is
    known to be)."""
    if (run["kwargs"].get("on_completion") or "delete") == "delete":
        if not ended:
            await wait_for(svc, run)
        await svc.db.threads.delete(run["tenant_id"], run["thread_id"])


async def _start(
    svc: Services,
    caller: Principal,
    thread_id: str | None,
    body: RunCreate,
    idempotency_key: str | None,
    response: Response,
) -> dict[str, Any]:
    run = (await create_run(svc, caller, thread_id, body, idempotency_key=idempotency_key)).run
    response.headers["Content-Location"] = run_path(run, thread_id is None)
    return public(run)


async def _start_streamed(
    svc: Services,
    caller: Principal,
    thread_id: str | None,
    body: RunCreate,
    idempotency_key: str | None,
) -> StreamingResponse:
    svc.streams.take(caller.tenant_id)  # before the run: a refused stream queues nothing
    try:
        queued = await create_run(svc, caller, thread_id, body, idempotency_key=idempotency_key)
    except BaseException:
        svc.streams.give_back(caller.tenant_id)
        raise
    run = queued.run
    return _sse(
        svc,
        run,
        stream_modes(run["kwargs"]) - ({"values"} - _asked(body)),
        -1,
        run_path(run, False),
        body.on_disconnect == "cancel",
        body.stream_resumable,
        fresh=not queued.replayed,
        stateless=thread_id is None,
    )


# --- thread runs ---------------------------------------------------------------------


@router.post("/threads/{thread_id}/runs")
async def create_thread_run(
    thread_id: str,
    body: RunCreate,
    svc: Svc,
    caller: Caller,
    response: Response,
    idempotency_key: IdemKey = None,
) -> dict[str, Any]:
    """Start a run in the background."""
    return await _start(svc, caller, thread_id, body, idempotency_key, response)


@router.post("/threads/{thread_id}/runs/stream")
async def stream_thread_run(
    thread_id: str, body: RunCreate, svc: Svc, caller: Caller, idempotency_key: IdemKey = None
) -> StreamingResponse:
    """Start a run and stream its events (SSE)."""
    return await _start_streamed(svc, caller, thread_id, body, idempotency_key)


def _asked(body: RunCreate) -> set[str]:
    return {body.stream_mode} if isinstance(body.stream_mode, str) else set(body.stream_mode)


@router.post("/threads/{thread_id}/runs/wait")
async def wait_thread_run(
    thread_id: str,
    body: RunCreate,
    svc: Svc,
    caller: Caller,
    response: Response,
    idempotency_key: IdemKey = None,
) -> dict[str, Any]:
    """Start a run and return the thread's values when it ends."""
    run = (await create_run(svc, caller, thread_id, body, idempotency_key=idempotency_key)).run
    response.headers["Content-Location"] = run_path(run, False)
    response.headers["Location"] = run_path(run, False) + "/join"
    return await _final_values(svc, run)


@router.get("/threads/{thread_id}/runs")
async def list_runs(
    thread_id: str,
    svc: Svc,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    status: RunStatus | None = None,
) -> list[dict[str, Any]]:
    """Runs of a thread, newest first."""
    await get_thread(svc, caller.tenant_id, thread_id)
    rows = await svc.db.runs.of_thread(
        caller.tenant_id, thread_id, limit=limit, offset=offset, status=status
    )
    return [public(r) for r in rows]


async def _get_run(
    svc: Services, tenant_id: str, run_id: str, thread_id: str | None
) -> dict[str, Any]:
    run = await svc.db.runs.get(tenant_id, run_id, thread_id)
    if run is None:
        raise not_found("run", run_id)
    return run


@router.get("/threads/{thread_id}/runs/{run_id}")
async def get_run(thread_id: str, run_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """One run."""
    return public(await _get_run(svc, caller.tenant_id, run_id, thread_id))


@router.delete("/threads/{thread_id}/runs/{run_id}", status_code=204)
async def delete_run(thread_id: str, run_id: str, svc: Svc, caller: Caller) -> Response:
    """Delete a run that is not active."""
    run = await _get_run(svc, caller.tenant_id, run_id, thread_id)
    if run["status"] in ("pending", "running"):
        raise APIError(409, f"run {run_id!r} is still {run['status']}; cancel it first")
    await svc.db.runs.delete(caller.tenant_id, run_id, thread_id)
    return Response(status_code=204)


@router.post("/threads/{thread_id}/runs/{run_id}/cancel")
async def cancel_run(
    thread_id: str,
    run_id: str,
    svc: Svc,
    caller: Caller,
    wait: bool = False,
    action: Literal["interrupt", "rollback"] = "interrupt",
) -> Response:
    """Cancel an active run (``action`` interrupt or rollback)."""
    run = await _get_run(svc, caller.tenant_id, run_id, thread_id)
    await svc.db.runs.cancel(caller.tenant_id, run_id, thread_id, action)
    svc.pool.cancel_everywhere(run_id)
    if wait:
        await wait_for(svc, run)
    return Response(status_code=202 if not wait else 204)


@router.get("/threads/{thread_id}/runs/{run_id}/join")
async def join_run(thread_id: str, run_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """Wait for a run and return the thread's values."""
    run = await _get_run(svc, caller.tenant_id, run_id, thread_id)
    return await _final_values(svc, run)


@router.get("/threads/{thread_id}/runs/{run_id}/stream")
async def join_run_stream(
    thread_id: str,
    run_id: str,
    svc: Svc,
    caller: Caller,
    request: Request,
    stream_mode: Annotated[list[str] | None, Query()] = None,
    cancel_on_disconnect: bool = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Stream a run's events from the start, or after ``Last-Event-ID``."""
    if cancel_on_disconnect and not caller.can_write:  # leaving would cancel the run
        raise APIError(403, "cancel_on_disconnect needs a read-write key: this one is read-only")
    after = _last_event_id(last_event_id)
    svc.streams.take(caller.tenant_id)  # first: a refused join costs no database read
    try:
        run = await _get_run(svc, caller.tenant_id, run_id, thread_id)
    except BaseException:
        svc.streams.give_back(caller.tenant_id)
        raise
    asked = {m for m in stream_mode or () if m}  # the SDK sends "stream_mode=" for "all"
    modes = asked or stream_modes(run["kwargs"])
    return _sse(svc, run, modes, after, run_path(run, False), cancel_on_disconnect)


# --- stateless runs ------------------------------------------------------------------


@router.post("/runs")
async def create_stateless_run(
    body: RunCreate,
    svc: Svc,
    caller: Caller,
    response: Response,
    idempotency_key: IdemKey = None,
) -> dict[str, Any]:
    """Start a run on a temporary thread."""
    return await _start(svc, caller, None, body, idempotency_key, response)


@router.post("/runs/stream")
async def stream_stateless_run(
    body: RunCreate, svc: Svc, caller: Caller, idempotency_key: IdemKey = None
) -> StreamingResponse:
    """Run on a temporary thread and stream its events."""
    return await _start_streamed(svc, caller, None, body, idempotency_key)


@router.post("/runs/wait")
async def wait_stateless_run(
    body: RunCreate,
    svc: Svc,
    caller: Caller,
    response: Response,
    idempotency_key: IdemKey = None,
) -> dict[str, Any]:
    """Run on a temporary thread and return its final values."""
    run = (await create_run(svc, caller, None, body, idempotency_key=idempotency_key)).run
    response.headers["Content-Location"] = run_path(run, True)
    values = await _final_values(svc, run)
    await _finish_stateless(svc, run, ended=True)
    return values


@router.get("/runs/{run_id}/attempts")
async def run_attempts(run_id: str, svc: Svc, caller: Caller) -> list[dict[str, Any]]:
    """The attempts at a run (a Nimbus extension): ``attempt`` (1, 2, …), the ``worker`` that
    claimed it (host:pid:id) and when (``claimed_at``). More than one means a worker stopped
    mid-run (a crash, a lost lease or a shutdown) and another resumed it."""
    await _get_run(svc, caller.tenant_id, run_id, None)
    return [
        {**a, "claimed_at": a["claimed_at"].isoformat()}
        for a in await svc.db.runs.attempts(caller.tenant_id, run_id)
    ]


@router.get("/runs/{run_id}")
async def get_stateless_run(run_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """One run, whatever its thread."""
    return public(await _get_run(svc, caller.tenant_id, run_id, None))
