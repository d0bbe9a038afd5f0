"""/threads/{id}/runs and stateless /runs: create, wait, stream, join, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.types import Receive, Scope, Send

from nimbus.adapters.api.deps import Caller, Services, Svc
from nimbus.adapters.api.errors import APIError, not_found
from nimbus.adapters.api.routes.threads import get_thread
from nimbus.adapters.api.run_requests import create_run
from nimbus.adapters.api.schemas import MAX_BATCH, RunCreate, RunsCancel
from nimbus.adapters.api.streams import TenantStreams
from nimbus.adapters.store.keys import Principal
from nimbus.records import ACTIVE
from nimbus.service.executor import stream_modes

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


async def events(
    svc: Services, run_id: str, modes: set[str], after: int, fresh: bool = False
) -> AsyncIterator[bytes]:
    """SSE frames of a run (see :meth:`RunService.events`), with heartbeats while it is quiet."""
    idle_s = svc.settings.sse_heartbeat_s or None
    async for event in svc.runs.events(run_id, after, idle_s, fresh):
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
                await svc.runs.finish_stateless(run, ended=True)  # its events ended with it
        finally:
            if not finished and cancel_on_disconnect:
                # The client is gone and this task is being cancelled: without the shield the
                # first await below would be cancelled too, and the run would go on.
                with anyio.CancelScope(shield=True):
                    await svc.runs.cancel(run["tenant_id"], run["run_id"], None)

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


def _last_event_id(value: str | None) -> int:
    if not value:
        return -1
    try:
        return int(value)
    except ValueError:
        raise APIError(422, f"Last-Event-ID must be an event number, got {value!r}") from None


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
    return await svc.runs.final_values(run)


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
    await svc.runs.cancel(caller.tenant_id, run_id, thread_id, action)
    if wait:
        await svc.runs.wait(run)
    return Response(status_code=202 if not wait else 204)


@router.get("/threads/{thread_id}/runs/{run_id}/join")
async def join_run(thread_id: str, run_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """Wait for a run and return the thread's values."""
    run = await _get_run(svc, caller.tenant_id, run_id, thread_id)
    return await svc.runs.final_values(run)


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


@router.post("/runs/batch")
async def create_run_batch(
    body: Annotated[list[RunCreate], Field(min_length=1, max_length=MAX_BATCH)],
    svc: Svc,
    caller: Caller,
) -> list[dict[str, Any]]:
    """Start stateless runs in the background, one per payload, in order (the SDK's
    ``create_batch``)."""
    return [public((await create_run(svc, caller, None, run)).run) for run in body]


@router.post("/runs/cancel", status_code=204)
async def cancel_runs(
    body: RunsCancel,
    svc: Svc,
    caller: Caller,
    action: Literal["interrupt", "rollback"] = "interrupt",
) -> Response:
    """Cancel runs (the SDK's ``cancel_many``): those of ``run_ids`` (of ``thread_id``, if
    given) that are active, or every active run of the caller with ``status`` (``all``:
    pending and running). Runs of other tenants are never touched."""
    statuses = ACTIVE if body.status in (None, "all") else (body.status,)
    await svc.runs.cancel_many(
        caller.tenant_id,
        action,
        run_ids=body.run_ids,
        thread_id=body.thread_id,
        statuses=statuses,
    )
    return Response(status_code=204)


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
    values = await svc.runs.final_values(run)
    await svc.runs.finish_stateless(run, ended=True)
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
