"""/threads: conversations, their state and history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from nimbus.adapters.api.deps import Caller, Reader, Svc
from nimbus.adapters.api.errors import APIError, not_found
from nimbus.adapters.api.schemas import (
    CheckpointRef,
    HistoryQuery,
    StateAt,
    StateUpdate,
    ThreadCount,
    ThreadCreate,
    ThreadPatch,
    ThreadSearch,
)
from nimbus.adapters.store.threads import ThreadStore
from nimbus.service.langgraph import from_lg, to_lg

router = APIRouter(prefix="/threads", tags=["threads"])

FIELDS = ("thread_id", "created_at", "updated_at", "metadata", "status", "values")


def public(row: dict[str, Any], select: list[str] | None = None) -> dict[str, Any]:
    """A thread as the API shows it."""
    out = {k: row.get(k) for k in FIELDS}
    out["interrupts"] = {}
    return {k: out[k] for k in select if k in out} if select else out


def state(
    thread_id: str, checkpoint: dict[str, Any] | None, values: dict[str, Any]
) -> dict[str, Any]:
    """A ThreadState: values at a checkpoint, with its parent."""

    def ref(checkpoint_id: str | None) -> dict[str, Any] | None:
        if checkpoint_id is None:
            return None
        return {
            "thread_id": thread_id,
            "checkpoint_ns": "",
            "checkpoint_id": checkpoint_id,
            "checkpoint_map": None,
        }

    return {
        "values": values,
        "next": list(checkpoint["next"]) if checkpoint else [],
        "tasks": [],
        "checkpoint": ref(checkpoint["checkpoint_id"]) if checkpoint else None,
        "metadata": checkpoint["metadata"] if checkpoint else {},
        "created_at": checkpoint["created_at"].isoformat() if checkpoint else None,
        "parent_checkpoint": ref(checkpoint["parent_id"]) if checkpoint else None,
        "interrupts": [],
    }


async def get_thread(svc: Svc, tenant_id: str, thread_id: str) -> dict[str, Any]:
    """A thread of this tenant, or 404."""
    row = await svc.db.threads.get(tenant_id, thread_id)
    if row is None:
        raise not_found("thread", thread_id)
    return row


@router.post("")
async def create_thread(body: ThreadCreate, svc: Svc, caller: Caller) -> dict[str, Any]:
    """Create a thread (``if_exists``: raise → 409, do_nothing → the existing one)."""
    row, created = await svc.db.threads.create(
        caller.tenant_id, thread_id=body.thread_id, metadata=body.metadata, if_exists=body.if_exists
    )
    if not row or (not created and body.if_exists == "raise"):
        raise APIError(409, f"thread {body.thread_id!r} already exists")
    return public(row)


@router.post("/search")
async def search_threads(body: ThreadSearch, svc: Svc, caller: Reader) -> list[dict[str, Any]]:
    """Threads matching metadata, values, ids and status."""
    rows = await svc.db.threads.search(
        caller.tenant_id,
        metadata=body.metadata,
        values=body.values,
        status=body.status,
        ids=body.ids,
        limit=body.limit,
        offset=body.offset,
        sort_by=body.sort_by,
        sort_order=body.sort_order,
    )
    return [public(r, body.select) for r in rows]


@router.post("/count")
async def count_threads(body: ThreadCount, svc: Svc, caller: Reader) -> int:
    """How many threads match."""
    return await svc.db.threads.count(
        caller.tenant_id, metadata=body.metadata, values=body.values, status=body.status
    )


@router.get("/{thread_id}")
async def read_thread(thread_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """One thread."""
    return public(await get_thread(svc, caller.tenant_id, thread_id))


@router.patch("/{thread_id}")
async def patch_thread(
    thread_id: str, body: ThreadPatch, svc: Svc, caller: Caller
) -> dict[str, Any]:
    """Merge metadata into a thread."""
    row = await svc.db.threads.patch(caller.tenant_id, thread_id, body.metadata)
    if row is None:
        raise not_found("thread", thread_id)
    return public(row)


@router.delete("/{thread_id}", status_code=204)
async def delete_thread(thread_id: str, svc: Svc, caller: Caller) -> Response:
    """Delete a thread with its runs and history."""
    if not await svc.db.threads.delete(caller.tenant_id, thread_id):
        raise not_found("thread", thread_id)
    return Response(status_code=204)


@router.post("/{thread_id}/copy")
async def copy_thread(thread_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """A copy of a thread, history included."""
    row = await svc.db.threads.copy(caller.tenant_id, thread_id)
    if row is None:
        raise not_found("thread", thread_id)
    return public(row)


@router.get("/{thread_id}/state")
async def thread_state(thread_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """The thread's current state."""
    row = await get_thread(svc, caller.tenant_id, thread_id)
    checkpoint = None
    if row["checkpoint_id"]:
        checkpoint = await svc.db.threads.checkpoint(
            caller.tenant_id, thread_id, row["checkpoint_id"], values=False
        )
    return state(thread_id, checkpoint, row["values"])


@router.get("/{thread_id}/state/{checkpoint_id}")
async def thread_state_at(
    thread_id: str, checkpoint_id: str, svc: Svc, caller: Caller
) -> dict[str, Any]:
    """The thread's state at a checkpoint."""
    await get_thread(svc, caller.tenant_id, thread_id)
    checkpoint = await svc.db.threads.checkpoint(caller.tenant_id, thread_id, checkpoint_id)
    if checkpoint is None:
        raise not_found("checkpoint", checkpoint_id)
    return state(thread_id, checkpoint, checkpoint["values"])


@router.post("/{thread_id}/state/checkpoint")
async def thread_state_at_checkpoint(
    thread_id: str, body: StateAt, svc: Svc, caller: Reader
) -> dict[str, Any]:
    """The thread's state at ``checkpoint.checkpoint_id`` (the current one without it): what
    the SDK's ``get_state(checkpoint=…)`` asks for."""
    checkpoint_id = body.checkpoint.checkpoint_id
    if checkpoint_id is None:
        return await thread_state(thread_id, svc, caller)
    return await thread_state_at(thread_id, checkpoint_id, svc, caller)


@router.post("/{thread_id}/state")
async def update_state(
    thread_id: str, body: StateUpdate, svc: Svc, caller: Caller
) -> dict[str, Any]:
    """Add or replace messages (by id) in the thread's values, as a new checkpoint."""
    row = await get_thread(svc, caller.tenant_id, thread_id)
    if row["status"] == "busy":
        raise APIError(409, f"thread {thread_id!r} is busy with a run")
    update = body.values if isinstance(body.values, dict) else {"messages": body.values or []}
    unknown = set(update) - {"messages"}
    if unknown:
        raise APIError(
            422, f"unknown state keys {sorted(unknown)}; the agent's state has 'messages'"
        )
    incoming = update.get("messages") or []
    if isinstance(incoming, dict | str):
        incoming = [incoming]
    if not isinstance(incoming, list):
        raise APIError(422, "values.messages must be a list of messages")
    messages = list(row["values"].get("messages", []))
    index = {m.get("id"): i for i, m in enumerate(messages)}
    for n, data in enumerate(incoming):
        message = from_lg(data)  # validates the shape
        given = data.get("id") if isinstance(data, dict) else None
        if given is not None and not isinstance(given, str):
            raise APIError(422, f"values.messages[{n}].id must be a string")
        message_id = given or f"state-{len(messages)}-{n}"
        shaped = to_lg(message, message_id)
        if message_id in index:
            messages[index[message_id]] = shaped
        else:
            index[message_id] = len(messages)
            messages.append(shaped)
    if row["checkpoint_id"] is None and not row["metadata"].get("graph_id"):
        # as LangGraph: a thread's state is its graph's, and this one has none yet
        raise APIError(
            400,
            f"thread {thread_id!r} has no graph yet: run it first, or create it with a "
            "graph_id (metadata.graph_id)",
        )
    async with svc.db.engine.begin() as conn:
        checkpoint_id = await ThreadStore.save_checkpoint(
            conn,
            caller.tenant_id,
            thread_id,
            values={"messages": messages},
            metadata={"source": "update", "as_node": body.as_node},
            step=-1,
            run_id=None,
            next_nodes=[],
        )
    return {
        "checkpoint": {
            "thread_id": thread_id,
            "checkpoint_ns": "",
            "checkpoint_id": checkpoint_id,
            "checkpoint_map": None,
        }
    }


@router.post("/{thread_id}/history")
async def thread_history(
    thread_id: str, body: HistoryQuery, svc: Svc, caller: Reader
) -> list[dict[str, Any]]:
    """Past states of the thread, newest first."""
    await get_thread(svc, caller.tenant_id, thread_id)
    before = body.before.checkpoint_id if isinstance(body.before, CheckpointRef) else body.before
    rows = await svc.db.threads.history(
        caller.tenant_id, thread_id, limit=body.limit, before=before, metadata=body.metadata
    )
    return [state(thread_id, r, r["values"]) for r in rows]


@router.get("/{thread_id}/history")
async def thread_history_get(
    thread_id: str,
    svc: Svc,
    caller: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> list[dict[str, Any]]:
    """Past states of the thread (GET form)."""
    return await thread_history(thread_id, HistoryQuery(limit=limit, before=before), svc, caller)
