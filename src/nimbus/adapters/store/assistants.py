"""Assistants and their versions, per tenant."""

from __future__ import annotations

import uuid
from typing import Any, cast

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store.common import JsonMatch, insert_new, now, row
from nimbus.adapters.store.engine import autocommit
from nimbus.adapters.store.postgres_runs import PostgresRuns
from nimbus.adapters.store.schema import assistant_versions, assistants
from nimbus.adapters.store.sqlite_runs import SqliteRuns
from nimbus.records import Assistant, new_id

SORTABLE = {"assistant_id", "graph_id", "name", "created_at", "updated_at"}
VERSIONED = ("graph_id", "name", "description", "config", "context", "metadata")


class AssistantStore:
    """Queries on assistants; every method is scoped by ``tenant_id``."""

    def __init__(
        self,
        engine: AsyncEngine,
        pg_runs: PostgresRuns | None = None,
        sqlite_runs: SqliteRuns | None = None,
    ) -> None:
        self.engine = engine
        self.auto = autocommit(engine)
        self.pg_runs = pg_runs
        self.sqlite_runs = sqlite_runs

    async def get(self, tenant_id: str, assistant_id: str) -> Assistant | None:
        """One assistant, or None (also when it belongs to another tenant)."""
        if self.pg_runs is not None:
            found = await self.pg_runs.assistant(tenant_id, assistant_id)
        else:
            assert self.sqlite_runs is not None, "a database is PostgreSQL or SQLite"
            found = await self.sqlite_runs.assistant(tenant_id, assistant_id)
        return cast(Assistant | None, found)

    async def find(self, tenant_id: str, id_or_name: str) -> Assistant | None:
        """An assistant by id; else the first one made from the graph of that name; else the
        newest one with that name (PostgreSQL: in one round trip)."""
        if self.pg_runs is not None:
            found = await self.pg_runs.find_assistant(tenant_id, id_or_name)
        else:
            assert self.sqlite_runs is not None, "a database is PostgreSQL or SQLite"
            found = await self.sqlite_runs.find_assistant(tenant_id, id_or_name)
        return cast(Assistant | None, found)

    async def ensure_system(self, tenant_id: str, graph_id: str) -> Assistant:
        """The tenant's system assistant of a graph (made on first use, as LangGraph does)."""
        assistant_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"nimbus/{tenant_id}/{graph_id}"))
        row, _ = await self.create(
            tenant_id,
            assistant_id=assistant_id,
            graph_id=graph_id,
            name=graph_id,
            description=None,
            config={},
            context={},
            metadata={"created_by": "system"},
            if_exists="do_nothing",
        )
        return cast(Assistant, row)

    async def create(
        self,
        tenant_id: str,
        *,
        assistant_id: str | None,
        graph_id: str,
        name: str | None,
        description: str | None,
        config: dict[str, Any],
        context: dict[str, Any],
        metadata: dict[str, Any],
        if_exists: str = "raise",
    ) -> tuple[dict[str, Any], bool]:
        """Create an assistant (version 1); returns it and whether it was created.

        With ``if_exists="do_nothing"`` an existing id is returned as is. Ids are per tenant:
        another tenant's assistant of the same id is not seen here.
        """
        assistant_id = assistant_id or new_id()
        async with self.engine.begin() as conn:
            stamp = now()
            values = {
                "assistant_id": assistant_id,
                "tenant_id": tenant_id,
                "graph_id": graph_id,
                "name": name or "Untitled",
                "description": description,
                "config": config,
                "context": context,
                "metadata": metadata,
                "version": 1,
                "created_at": stamp,
                "updated_at": stamp,
            }
            inserted = await conn.execute(insert_new(self.engine.dialect.name, assistants), values)
            if not inserted.rowcount:  # made by someone else, perhaps just now
                existing = (
                    (
                        await conn.execute(
                            select(assistants).where(
                                assistants.c.tenant_id == tenant_id,
                                assistants.c.assistant_id == assistant_id,
                            )
                        )
                    )
                    .mappings()
                    .first()
                )
                if existing is not None and if_exists == "do_nothing":
                    return row(existing) or {}, False
                return {}, False
            await conn.execute(
                assistant_versions.insert().values(
                    **{k: values[k] for k in ("assistant_id", "tenant_id", *VERSIONED)},
                    version=1,
                    created_at=stamp,
                )
            )
        return values, True

    async def update(
        self, tenant_id: str, assistant_id: str, changes: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Apply ``changes`` as a new version (metadata is merged); None if not found."""
        async with self.engine.begin() as conn:
            current = row(
                (
                    await conn.execute(
                        select(assistants)
                        .where(
                            assistants.c.tenant_id == tenant_id,
                            assistants.c.assistant_id == assistant_id,
                        )
                        .with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            if current is None:
                return None
            latest = await conn.scalar(
                select(func.max(assistant_versions.c.version)).where(
                    assistant_versions.c.tenant_id == tenant_id,
                    assistant_versions.c.assistant_id == assistant_id,
                )
            )
            updated = dict(current)
            for key, value in changes.items():
                if value is None:
                    continue
                updated[key] = {**current["metadata"], **value} if key == "metadata" else value
            updated["version"] = (latest or 0) + 1
            updated["updated_at"] = now()
            await conn.execute(
                update(assistants)
                .where(
                    assistants.c.tenant_id == tenant_id, assistants.c.assistant_id == assistant_id
                )
                .values(**{k: updated[k] for k in (*VERSIONED, "version", "updated_at")})
            )
            await conn.execute(
                assistant_versions.insert().values(
                    assistant_id=assistant_id,
                    tenant_id=tenant_id,
                    version=updated["version"],
                    created_at=updated["updated_at"],
                    **{k: updated[k] for k in VERSIONED},
                )
            )
        return updated

    async def set_latest(
        self, tenant_id: str, assistant_id: str, version: int
    ) -> dict[str, Any] | None:
        """Make an earlier version current again; None if the assistant or version is missing."""
        async with self.engine.begin() as conn:
            found = row(
                (
                    await conn.execute(
                        select(assistant_versions).where(
                            assistant_versions.c.tenant_id == tenant_id,
                            assistant_versions.c.assistant_id == assistant_id,
                            assistant_versions.c.version == version,
                        )
                    )
                )
                .mappings()
                .first()
            )
            if found is None:
                return None
            stamp = now()
            await conn.execute(
                update(assistants)
                .where(
                    assistants.c.tenant_id == tenant_id, assistants.c.assistant_id == assistant_id
                )
                .values(version=version, updated_at=stamp, **{k: found[k] for k in VERSIONED})
            )
        return cast(dict[str, Any] | None, await self.get(tenant_id, assistant_id))

    async def delete(self, tenant_id: str, assistant_id: str) -> bool:
        """Delete an assistant and its versions; False if not found."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(assistants).where(
                    assistants.c.tenant_id == tenant_id, assistants.c.assistant_id == assistant_id
                )
            )
            await conn.execute(
                delete(assistant_versions).where(
                    assistant_versions.c.tenant_id == tenant_id,
                    assistant_versions.c.assistant_id == assistant_id,
                )
            )
        return bool(result.rowcount)

    async def search(
        self,
        tenant_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        graph_id: str | None = None,
        name: str | None = None,
        limit: int = 10,
        offset: int = 0,
        sort_by: str | None = None,
        sort_order: str | None = None,
    ) -> list[dict[str, Any]]:
        """Assistants matching the filters, newest first unless sorted otherwise."""
        query = self._filtered(tenant_id, graph_id, name)
        column = assistants.c[sort_by if sort_by in SORTABLE else "created_at"]
        query = query.order_by(column.asc() if sort_order == "asc" else column.desc())
        match = JsonMatch(self.engine.dialect.name, (assistants.c.metadata, metadata))
        async with self.auto.connect() as conn:
            return await match.page(conn, query, limit, offset)

    async def count(
        self,
        tenant_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        graph_id: str | None = None,
        name: str | None = None,
    ) -> int:
        """How many assistants match the filters."""
        match = JsonMatch(self.engine.dialect.name, (assistants.c.metadata, metadata))
        async with self.auto.connect() as conn:
            return await match.count(conn, self._filtered(tenant_id, graph_id, name))

    @staticmethod
    def _filtered(tenant_id: str, graph_id: str | None, name: str | None) -> Select[Any]:
        query = select(assistants).where(assistants.c.tenant_id == tenant_id)
        if graph_id:
            query = query.where(assistants.c.graph_id == graph_id)
        if name:
            query = query.where(assistants.c.name.contains(name, autoescape=True))
        return query

    async def versions(
        self,
        tenant_id: str,
        assistant_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Versions of an assistant, newest first."""
        query = (
            select(assistant_versions)
            .where(
                assistant_versions.c.tenant_id == tenant_id,
                assistant_versions.c.assistant_id == assistant_id,
            )
            .order_by(assistant_versions.c.version.desc())
        )
        match = JsonMatch(self.engine.dialect.name, (assistant_versions.c.metadata, metadata))
        async with self.auto.connect() as conn:
            return await match.page(conn, query, limit, offset)
