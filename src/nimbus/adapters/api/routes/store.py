"""/store: a key-value store with namespaces, per tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from nimbus.adapters.api.deps import Caller, Reader, Svc
from nimbus.adapters.api.errors import APIError
from nimbus.adapters.api.schemas import NamespaceList, StoreDelete, StorePut, StoreSearch
from nimbus.adapters.store.items import SEP

router = APIRouter(prefix="/store", tags=["store"])


MAX_NAMESPACE = 1000  # characters, labels and separators together (the column's width)


def _labels(namespace: list[str]) -> list[str]:
    """``namespace`` if every label is non-empty without '.', and it fits the column; else 422."""
    for label in namespace:
        if not label or "." in label or SEP in label:
            raise APIError(
                422, f"namespace labels must be non-empty and contain no '.', got {label!r}"
            )
    if len(SEP.join(namespace)) > MAX_NAMESPACE:
        raise APIError(422, f"namespace longer than {MAX_NAMESPACE} characters in all")
    return namespace


def _public(item: dict[str, Any]) -> dict[str, Any]:
    out = dict(item)
    for key in ("created_at", "updated_at"):
        out[key] = out[key].isoformat()
    return out


@router.put("/items", status_code=204)
async def put_item(body: StorePut, svc: Svc, caller: Caller) -> Response:
    """Insert or replace an item."""
    await svc.db.items.put(caller.tenant_id, _labels(body.namespace), body.key, body.value)
    return Response(status_code=204)


@router.get("/items")
async def get_item(
    svc: Svc,
    caller: Caller,
    key: str,
    namespace: Annotated[str | None, Query()] = None,
    refresh_ttl: bool | None = None,
) -> dict[str, Any] | None:
    """One item, or null when there is none (as LangGraph answers: the SDKs' ``get_item``
    returns None); ``namespace`` is dot-separated."""
    labels = _labels(namespace.split(".")) if namespace else []
    item = await svc.db.items.get(caller.tenant_id, labels, key)
    return None if item is None else _public(item)


@router.delete("/items", status_code=204)
async def delete_item(body: StoreDelete, svc: Svc, caller: Caller) -> Response:
    """Delete an item."""
    await svc.db.items.delete(caller.tenant_id, _labels(body.namespace), body.key)
    return Response(status_code=204)


@router.post("/items/search")
async def search_items(body: StoreSearch, svc: Svc, caller: Reader) -> dict[str, Any]:
    """Items under a namespace prefix, filtered, optionally ranked by a text query."""
    items = await svc.db.items.search(
        caller.tenant_id,
        _labels(body.namespace_prefix),
        filter=body.filter,
        query=body.query,
        limit=body.limit,
        offset=body.offset,
    )
    return {"items": [_public(i) for i in items]}


@router.post("/namespaces")
async def list_namespaces(body: NamespaceList, svc: Svc, caller: Reader) -> dict[str, Any]:
    """Namespaces in use."""
    found = await svc.db.items.namespaces(
        caller.tenant_id,
        prefix=_labels(body.prefix or []),
        suffix=_labels(body.suffix or []),
        max_depth=body.max_depth,
        limit=body.limit,
        offset=body.offset,
    )
    return {"namespaces": found}
