"""A run's request, checked and turned into a :class:`~nimbus.service.runs.RunRequest`: what
the run routes and the OpenAI facade queue."""

from __future__ import annotations

import hashlib
import json

from nimbus.adapters.api.deps import Services
from nimbus.adapters.api.errors import APIError, not_found
from nimbus.adapters.api.schemas import RunCreate, path_id
from nimbus.adapters.store.keys import Principal
from nimbus.records import Assistant, Queued
from nimbus.service.langgraph import check_input, input_messages
from nimbus.service.runs import RunRequest

MAX_ID = 64  # the width of the id columns


def request_hash(thread_id: str | None, body: RunCreate) -> str:
    """What an Idempotency-Key stands for: the thread and the whole request body."""
    request = {"thread_id": thread_id, "body": body.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


async def create_run(
    svc: Services,
    caller: Principal,
    thread_id: str | None,
    body: RunCreate,
    idempotency_key: str | None = None,
    assistant: Assistant | None = None,
) -> Queued:
    """Check a run's request and queue it (:meth:`nimbus.service.runs.RunService.create`).
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
        "stream_mode": body.stream_mode,
        "command": body.command,
        "on_completion": body.on_completion,
        "durability": body.durability or svc.settings.durability,
    }
    request = RunRequest(
        caller.tenant_id,
        body.assistant_id,
        thread_id,
        kwargs,
        body.metadata,
        body.multitask_strategy,
        body.if_not_exists,
        (idempotency_key, request_hash(thread_id, body)) if idempotency_key else None,
        body.config,
        body.context,
    )
    return await svc.runs.create(request, assistant)
