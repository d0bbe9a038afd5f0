"""/ok, /info, /metrics and the admin key endpoints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nimbus import __version__
from nimbus.adapters.api.deps import Admin, Svc
from nimbus.adapters.api.errors import APIError, not_found
from nimbus.adapters.api.schemas import KeyCreate
from nimbus.adapters.store.engine import ping
from nimbus.adapters.store.keys import OPERATOR_TENANT
from nimbus.service.metrics import METRICS

health = APIRouter(tags=["system"])  #: /ok, /info, /metrics: also served by a worker
router = APIRouter(tags=["system"])


@health.get("/ok")
async def ok(svc: Svc) -> dict[str, Any]:
    """Liveness and readiness: the database answers."""
    try:
        async with svc.db.engine.connect() as conn:
            await ping(conn)
    except Exception:
        raise APIError(503, "database unavailable", {"Retry-After": "5"}) from None
    return {"ok": True}


@health.get("/info")
async def info() -> dict[str, Any]:
    """Server version and features."""
    return {
        "version": __version__,
        "name": "nimbus",
        "flags": {"assistants": True, "crons": False, "langsmith": False},
    }


@health.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/keys")
async def create_key(body: KeyCreate, svc: Svc, caller: Admin) -> dict[str, Any]:
    """Create an API key for a tenant; the key is in this response only."""
    if caller.tenant_id != OPERATOR_TENANT and body.tenant_id != caller.tenant_id:
        raise APIError(403, "an admin key may only create keys for its own tenant")
    key, info = await svc.db.keys.create(body.tenant_id, body.scope, body.name)
    return {
        "key": key,
        "key_id": info.key_id,
        "tenant_id": info.tenant_id,
        "scope": info.scope,
        "name": info.name,
        "prefix": info.prefix,
        "created_at": info.created_at.isoformat(),
    }


@router.get("/admin/keys")
async def list_keys(svc: Svc, caller: Admin) -> list[dict[str, Any]]:
    """Every key's description (never the keys)."""
    return [
        {
            "key_id": k.key_id,
            "tenant_id": k.tenant_id,
            "prefix": k.prefix,
            "scope": k.scope,
            "name": k.name,
            "created_at": k.created_at.isoformat(),
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        }
        for k in await svc.db.keys.all(
            None if caller.tenant_id == OPERATOR_TENANT else caller.tenant_id
        )
    ]


@router.delete("/admin/keys/{key_id}", status_code=204)
async def revoke_key(key_id: str, svc: Svc, caller: Admin) -> Response:
    """Revoke a key."""
    scope = None if caller.tenant_id == OPERATOR_TENANT else caller.tenant_id
    if not await svc.db.keys.revoke(key_id, scope):
        raise not_found("key", key_id)
    return Response(status_code=204)
