"""/assistants: Nimbus agents as LangGraph assistants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Response

from nimbus.adapters.api.deps import Caller, Reader, Svc
from nimbus.adapters.api.errors import APIError, not_found
from nimbus.adapters.api.schemas import (
    AssistantCount,
    AssistantCreate,
    AssistantPatch,
    AssistantSearch,
    SetLatest,
    VersionSearch,
)
from nimbus.records import Assistant
from nimbus.service.agents import CONFIG_SCHEMA, GRAPHS, STATE_SCHEMA

router = APIRouter(prefix="/assistants", tags=["assistants"])

FIELDS = (
    "assistant_id",
    "graph_id",
    "config",
    "context",
    "metadata",
    "version",
    "created_at",
    "updated_at",
    "name",
    "description",
)


def public(row: Mapping[str, Any], select: list[str] | None = None) -> dict[str, Any]:
    """An assistant as the API shows it."""
    out = {k: row.get(k) for k in FIELDS}
    return {k: out[k] for k in select if k in out} if select else out


@router.post("")
async def create_assistant(body: AssistantCreate, svc: Svc, caller: Caller) -> dict[str, Any]:
    """Create an assistant (``if_exists``: raise → 409, do_nothing → the existing one)."""
    svc.agents.validate(body.graph_id, body.config, body.context)
    row, created = await svc.db.assistants.create(
        caller.tenant_id,
        assistant_id=body.assistant_id,
        graph_id=body.graph_id,
        name=body.name,
        description=body.description,
        config=body.config,
        context=body.context,
        metadata=body.metadata,
        if_exists=body.if_exists,
    )
    if not row:
        raise APIError(409, f"assistant {body.assistant_id!r} already exists")
    if not created and body.if_exists == "raise":
        raise APIError(409, f"assistant {body.assistant_id!r} already exists")
    return public(row)


@router.post("/search")
async def search_assistants(
    body: AssistantSearch, svc: Svc, caller: Reader
) -> list[dict[str, Any]]:
    """Assistants matching metadata, graph id and name."""
    rows = await svc.db.assistants.search(
        caller.tenant_id,
        metadata=body.metadata,
        graph_id=body.graph_id,
        name=body.name,
        limit=body.limit,
        offset=body.offset,
        sort_by=body.sort_by,
        sort_order=body.sort_order,
    )
    return [public(r, body.select) for r in rows]


@router.post("/count")
async def count_assistants(body: AssistantCount, svc: Svc, caller: Reader) -> int:
    """How many assistants match."""
    return await svc.db.assistants.count(
        caller.tenant_id, metadata=body.metadata, graph_id=body.graph_id, name=body.name
    )


async def _get(svc: Svc, tenant_id: str, assistant_id: str) -> Assistant:
    row = await svc.db.assistants.get(tenant_id, assistant_id)
    if row is None:
        raise not_found("assistant", assistant_id)
    return row


@router.get("/{assistant_id}")
async def get_assistant(assistant_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """One assistant."""
    return public(await _get(svc, caller.tenant_id, assistant_id))


@router.patch("/{assistant_id}")
async def patch_assistant(
    assistant_id: str, body: AssistantPatch, svc: Svc, caller: Caller
) -> dict[str, Any]:
    """Change an assistant; every change is a new version."""
    current = await _get(svc, caller.tenant_id, assistant_id)
    svc.agents.validate(
        body.graph_id or current["graph_id"],
        body.config if body.config is not None else current["config"],
        body.context if body.context is not None else current["context"],
    )
    row = await svc.db.assistants.update(
        caller.tenant_id, assistant_id, body.model_dump(exclude_unset=True)
    )
    if row is None:
        raise not_found("assistant", assistant_id)
    return public(row)


@router.delete("/{assistant_id}", status_code=204)
async def delete_assistant(assistant_id: str, svc: Svc, caller: Caller) -> Response:
    """Delete an assistant, its versions and its runs (active ones are cancelled first)."""
    await _get(svc, caller.tenant_id, assistant_id)
    await svc.runs.forget_assistant(caller.tenant_id, assistant_id)
    if not await svc.db.assistants.delete(caller.tenant_id, assistant_id):
        raise not_found("assistant", assistant_id)
    return Response(status_code=204)


@router.post("/{assistant_id}/versions")
async def assistant_versions(
    assistant_id: str, body: VersionSearch, svc: Svc, caller: Reader
) -> list[dict[str, Any]]:
    """Versions of an assistant, newest first."""
    await _get(svc, caller.tenant_id, assistant_id)
    rows = await svc.db.assistants.versions(
        caller.tenant_id, assistant_id, metadata=body.metadata, limit=body.limit, offset=body.offset
    )
    return [public({**r, "updated_at": r["created_at"]}) for r in rows]


@router.post("/{assistant_id}/latest")
async def set_latest_version(
    assistant_id: str, body: SetLatest, svc: Svc, caller: Caller
) -> dict[str, Any]:
    """Make an earlier version current."""
    await _get(svc, caller.tenant_id, assistant_id)
    row = await svc.db.assistants.set_latest(caller.tenant_id, assistant_id, body.version)
    if row is None:
        raise not_found("version", str(body.version))
    return public(row)


@router.get("/{assistant_id}/schemas")
async def assistant_schemas(assistant_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """The input, output, state, config and context schemas of the assistant's graph."""
    row = await _get(svc, caller.tenant_id, assistant_id)
    return {
        "graph_id": row["graph_id"],
        "input_schema": STATE_SCHEMA,
        "output_schema": STATE_SCHEMA,
        "state_schema": STATE_SCHEMA,
        "config_schema": {
            "title": "Config",
            "type": "object",
            "properties": {"configurable": CONFIG_SCHEMA},
        },
        "context_schema": CONFIG_SCHEMA,
    }


@router.get("/{assistant_id}/graph")
async def assistant_graph(assistant_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """The agent loop drawn as a graph: start → agent ⇄ tools → end."""
    row = await _get(svc, caller.tenant_id, assistant_id)
    return {
        "nodes": [
            {"id": "__start__", "type": "schema", "data": "__start__"},
            {
                "id": "agent",
                "type": "runnable",
                "data": {"name": row["graph_id"], "description": GRAPHS.get(row["graph_id"], "")},
            },
            {"id": "tools", "type": "runnable", "data": {"name": "tools"}},
            {"id": "__end__", "type": "schema", "data": "__end__"},
        ],
        "edges": [
            {"source": "__start__", "target": "agent"},
            {"source": "agent", "target": "tools", "conditional": True},
            {"source": "tools", "target": "agent"},
            {"source": "agent", "target": "__end__", "conditional": True},
        ],
    }


@router.get("/{assistant_id}/subgraphs")
async def assistant_subgraphs(assistant_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """The agent has no subgraphs."""
    await _get(svc, caller.tenant_id, assistant_id)
    return {}
