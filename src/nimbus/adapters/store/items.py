"""The key-value store (LangGraph ``/store``), per tenant."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store.common import matches, now, row
from nimbus.adapters.store.engine import autocommit
from nimbus.adapters.store.schema import store_items

SEP = "\x1f"  # joins namespace parts; cannot appear in a label (checked at the API)


def join(namespace: list[str]) -> str:
    """A namespace as stored."""
    return SEP.join(namespace)


def split(stored: str) -> list[str]:
    """A stored namespace as a list of labels."""
    return stored.split(SEP) if stored else []


def _item(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "namespace": split(r["namespace"]),
        "key": r["key"],
        "value": r["value"],
        "created_at": r["created_at"],
        "updated_at": r["updated_at"],
    }


class ItemStore:
    """Put, get, delete, search and list namespaces; scoped by tenant."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.auto = autocommit(engine)

    async def put(
        self, tenant_id: str, namespace: list[str], key: str, value: dict[str, Any]
    ) -> None:
        """Insert or replace an item."""
        ns = join(namespace)
        stamp = now()
        async with self.engine.begin() as conn:
            existing = await conn.scalar(
                select(store_items.c.created_at).where(
                    store_items.c.tenant_id == tenant_id,
                    store_items.c.namespace == ns,
                    store_items.c.key == key,
                )
            )
            await conn.execute(
                delete(store_items).where(
                    store_items.c.tenant_id == tenant_id,
                    store_items.c.namespace == ns,
                    store_items.c.key == key,
                )
            )
            await conn.execute(
                store_items.insert().values(
                    tenant_id=tenant_id,
                    namespace=ns,
                    key=key,
                    value=value,
                    created_at=existing or stamp,
                    updated_at=stamp,
                )
            )

    async def get(self, tenant_id: str, namespace: list[str], key: str) -> dict[str, Any] | None:
        """One item, or None."""
        async with self.auto.connect() as conn:
            found = row(
                (
                    await conn.execute(
                        select(store_items).where(
                            store_items.c.tenant_id == tenant_id,
                            store_items.c.namespace == join(namespace),
                            store_items.c.key == key,
                        )
                    )
                )
                .mappings()
                .first()
            )
        return _item(found) if found else None

    async def delete(self, tenant_id: str, namespace: list[str], key: str) -> None:
        """Delete an item (no error if absent)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(store_items).where(
                    store_items.c.tenant_id == tenant_id,
                    store_items.c.namespace == join(namespace),
                    store_items.c.key == key,
                )
            )

    async def search(
        self,
        tenant_id: str,
        prefix: list[str],
        *,
        filter: dict[str, Any] | None = None,
        query: str | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Items under a namespace prefix matching ``filter``; ``query`` ranks by term overlap."""
        stmt = select(store_items).where(store_items.c.tenant_id == tenant_id)
        if prefix:
            ns = join(prefix)
            stmt = stmt.where(
                (store_items.c.namespace == ns)
                | store_items.c.namespace.startswith(ns + SEP, autoescape=True)
            )
        stmt = stmt.order_by(store_items.c.updated_at.desc())
        async with self.auto.connect() as conn:
            rows = [r for r in map(row, (await conn.execute(stmt)).mappings().all()) if r]
        items = [_item(r) for r in rows if matches(r["value"], filter)]
        if query:
            terms = {t for t in query.lower().split() if t}
            scored = []
            for item in items:
                text = str(item["value"]).lower()
                score = sum(text.count(t) for t in terms) / max(len(terms), 1)
                if score > 0:
                    scored.append({**item, "score": float(score)})
            scored.sort(key=lambda i: -i["score"])
            items = scored
        return items[offset : offset + limit]

    async def namespaces(
        self,
        tenant_id: str,
        *,
        prefix: list[str] | None = None,
        suffix: list[str] | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[list[str]]:
        """Distinct namespaces (cut to ``max_depth``) matching prefix and suffix."""
        async with self.auto.connect() as conn:
            stored = (
                (
                    await conn.execute(
                        select(func.distinct(store_items.c.namespace)).where(
                            store_items.c.tenant_id == tenant_id
                        )
                    )
                )
                .scalars()
                .all()
            )
        found: set[tuple[str, ...]] = set()
        for ns in stored:
            parts = split(ns)
            if prefix and parts[: len(prefix)] != prefix:
                continue
            if suffix and parts[-len(suffix) :] != suffix:
                continue
            found.add(tuple(parts[:max_depth] if max_depth else parts))
        return [list(p) for p in sorted(found)][offset : offset + limit]
