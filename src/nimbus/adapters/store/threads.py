"""Threads and their checkpoints (the state history), per tenant."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Select, bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from nimbus.adapters.store.checkpoints import complete
from nimbus.adapters.store.common import JsonMatch, insert_new, now, row
from nimbus.adapters.store.engine import autocommit
from nimbus.adapters.store.postgres_runs import PostgresRuns
from nimbus.adapters.store.schema import checkpoints, run_attempts, run_events, runs, threads
from nimbus.records import new_id
from nimbus.service.checkpoints import appended, messages_of, stored_kind

# Built once: building a statement costs more than running it on SQLite.
_GET = select(threads).where(
    threads.c.tenant_id == bindparam("tenant_id"), threads.c.thread_id == bindparam("thread_id")
)
# A checkpoint without its values (nor how they are stored).
_WITHOUT_VALUES = [c for c in checkpoints.c if c.name not in ("values", "kind", "seq")]
SORTABLE = {"thread_id", "status", "created_at", "updated_at"}
STATUSES = {"idle", "busy", "interrupted", "error"}


def get_thread(conn: Connection, tenant_id: str, thread_id: str) -> dict[str, Any] | None:
    """One thread of the tenant, or None (synchronous, for ``run_sync``)."""
    found = conn.execute(_GET, {"tenant_id": tenant_id, "thread_id": thread_id})
    return row(found.mappings().first())


def create_thread(
    conn: Connection,
    tenant_id: str,
    thread_id: str | None,
    metadata: dict[str, Any],
    if_exists: str = "raise",
    status: str = "idle",
) -> tuple[dict[str, Any], bool]:
    """Create a thread (synchronous, for ``run_sync``); see :meth:`ThreadStore.create`."""
    thread_id = thread_id or new_id()
    stamp = now()
    values = {
        "thread_id": thread_id,
        "tenant_id": tenant_id,
        "status": status,
        "metadata": metadata,
        "values": {},
        "checkpoint_id": None,
        "created_at": stamp,
        "updated_at": stamp,
    }
    if conn.execute(insert_new(conn.dialect.name, threads), values).rowcount:
        return values, True
    existing = get_thread(conn, tenant_id, thread_id)  # made by someone else, perhaps just now
    if existing is not None and if_exists == "do_nothing":
        return existing, False
    return {}, False


class ThreadStore:
    """Queries on threads and checkpoints; every method is scoped by ``tenant_id``."""

    def __init__(self, engine: AsyncEngine, pg_runs: PostgresRuns | None = None) -> None:
        self.engine = engine
        self.auto = autocommit(engine)
        self.pg_runs = pg_runs

    async def get(self, tenant_id: str, thread_id: str) -> dict[str, Any] | None:
        """One thread, or None (also when it belongs to another tenant)."""
        if self.pg_runs is not None:
            return await self.pg_runs.thread(tenant_id, thread_id)
        async with self.auto.connect() as conn:
            return await self.get_in(conn, tenant_id, thread_id)

    @staticmethod
    async def get_in(
        conn: AsyncConnection, tenant_id: str, thread_id: str
    ) -> dict[str, Any] | None:
        """:meth:`get` inside an open connection or transaction."""
        result = await conn.execute(_GET, {"tenant_id": tenant_id, "thread_id": thread_id})
        return row(result.mappings().first())

    async def create(
        self,
        tenant_id: str,
        *,
        thread_id: str | None,
        metadata: dict[str, Any],
        if_exists: str = "raise",
    ) -> tuple[dict[str, Any], bool]:
        """Create a thread; returns it and whether it was created.

        An existing id is returned as is with ``if_exists="do_nothing"``, else as
        ``({}, False)``. Ids are per tenant: another tenant's thread of the same id is not
        seen here.
        """
        async with self.engine.begin() as conn:
            return await self.create_in(
                conn, tenant_id, thread_id=thread_id, metadata=metadata, if_exists=if_exists
            )

    @staticmethod
    async def create_in(
        conn: AsyncConnection,
        tenant_id: str,
        *,
        thread_id: str | None,
        metadata: dict[str, Any],
        if_exists: str = "raise",
        status: str = "idle",
    ) -> tuple[dict[str, Any], bool]:
        """:meth:`create` inside an open transaction."""
        return await conn.run_sync(create_thread, tenant_id, thread_id, metadata, if_exists, status)

    async def patch(
        self, tenant_id: str, thread_id: str, metadata: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Merge ``metadata`` into the thread's; None if not found."""
        async with self.engine.begin() as conn:
            current = await self.get_in(conn, tenant_id, thread_id)
            if current is None:
                return None
            merged = {**current["metadata"], **metadata}
            stamp = now()
            await conn.execute(
                update(threads)
                .where(threads.c.tenant_id == tenant_id, threads.c.thread_id == thread_id)
                .values(metadata=merged, updated_at=stamp)
            )
        return {**current, "metadata": merged, "updated_at": stamp}

    async def delete(self, tenant_id: str, thread_id: str) -> bool:
        """Delete a thread with its checkpoints, runs and run events."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(threads).where(
                    threads.c.tenant_id == tenant_id, threads.c.thread_id == thread_id
                )
            )
            if not result.rowcount:
                return False
            await conn.execute(
                delete(checkpoints).where(
                    checkpoints.c.tenant_id == tenant_id, checkpoints.c.thread_id == thread_id
                )
            )
            of_thread = (runs.c.tenant_id == tenant_id, runs.c.thread_id == thread_id)
            run_ids = select(runs.c.run_id).where(*of_thread)
            await conn.execute(delete(run_events).where(run_events.c.run_id.in_(run_ids)))
            await conn.execute(delete(run_attempts).where(run_attempts.c.run_id.in_(run_ids)))
            await conn.execute(delete(runs).where(*of_thread))
        return True

    @staticmethod
    def _filtered(tenant_id: str, status: str | None, ids: list[str] | None) -> Select[Any]:
        query = select(threads).where(threads.c.tenant_id == tenant_id)
        if status:
            query = query.where(threads.c.status == status)
        if ids:
            query = query.where(threads.c.thread_id.in_(ids))
        return query

    def _match(self, metadata: dict[str, Any] | None, values: dict[str, Any] | None) -> JsonMatch:
        return JsonMatch(
            self.engine.dialect.name, (threads.c.metadata, metadata), (threads.c["values"], values)
        )

    async def search(
        self,
        tenant_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        values: dict[str, Any] | None = None,
        status: str | None = None,
        ids: list[str] | None = None,
        limit: int = 10,
        offset: int = 0,
        sort_by: str | None = None,
        sort_order: str | None = None,
    ) -> list[dict[str, Any]]:
        """Threads matching the filters."""
        query = self._filtered(tenant_id, status, ids)
        column = threads.c[sort_by if sort_by in SORTABLE else "created_at"]
        query = query.order_by(column.asc() if sort_order == "asc" else column.desc())
        async with self.auto.connect() as conn:
            return await self._match(metadata, values).page(conn, query, limit, offset)

    async def count(
        self,
        tenant_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        values: dict[str, Any] | None = None,
        status: str | None = None,
        ids: list[str] | None = None,
    ) -> int:
        """How many threads match the filters."""
        async with self.auto.connect() as conn:
            return await self._match(metadata, values).count(
                conn, self._filtered(tenant_id, status, ids)
            )

    async def copy(self, tenant_id: str, thread_id: str) -> dict[str, Any] | None:
        """A new thread with the same metadata, values and history."""
        async with self.engine.begin() as conn:
            source = await self.get_in(conn, tenant_id, thread_id)
            if source is None:
                return None
            stamp = now()
            copy = {
                **source,
                "thread_id": new_id(),
                "status": "idle",
                "created_at": stamp,
                "updated_at": stamp,
            }
            history = (
                (
                    await conn.execute(
                        select(checkpoints)
                        .where(
                            checkpoints.c.tenant_id == tenant_id,
                            checkpoints.c.thread_id == thread_id,
                        )
                        .order_by(checkpoints.c.created_at)
                    )
                )
                .mappings()
                .all()
            )
            # Rows are copied as stored: an append row still appends to its (renamed) parent.
            renamed = {h["checkpoint_id"]: new_id() for h in history}
            copy["checkpoint_id"] = renamed.get(source["checkpoint_id"])
            await conn.execute(threads.insert().values(**copy))
            if history:
                await conn.execute(
                    checkpoints.insert(),
                    [
                        {
                            **h,
                            "checkpoint_id": renamed[h["checkpoint_id"]],
                            "parent_id": renamed.get(h["parent_id"]),
                            "thread_id": copy["thread_id"],
                        }
                        for h in history
                    ],
                )
        return copy

    @staticmethod
    async def save_checkpoint(
        conn: AsyncConnection,
        tenant_id: str,
        thread_id: str,
        *,
        values: dict[str, Any],
        metadata: dict[str, Any],
        step: int,
        run_id: str | None,
        next_nodes: list[str],
    ) -> str:
        """Append a checkpoint and make it the thread's current values (run steps are written
        by :mod:`nimbus.adapters.store.writer`; this is for state updates through the API). It is
        stored as the messages it appends when that is all it changes (see
        :mod:`nimbus.adapters.store.checkpoints`)."""
        current = (
            await conn.execute(
                select(threads.c.checkpoint_id, threads.c["values"]).where(
                    threads.c.tenant_id == tenant_id, threads.c.thread_id == thread_id
                )
            )
        ).first()
        parent_id, parent_values = current if current is not None else (None, None)
        parent = None
        if parent_id is not None:
            parent = (
                await conn.execute(
                    select(checkpoints.c.seq).where(checkpoints.c.checkpoint_id == parent_id)
                )
            ).first()
        seq = 0 if parent is None or parent.seq is None else parent.seq + 1
        adds = appended(messages_of(parent_values), values)
        kind = stored_kind(seq, adds, parent is not None)
        checkpoint_id = new_id()
        stamp = now()
        await conn.execute(
            checkpoints.insert().values(
                checkpoint_id=checkpoint_id,
                tenant_id=tenant_id,
                thread_id=thread_id,
                parent_id=parent_id,
                run_id=run_id,
                step=step,
                kind=kind,
                seq=seq,
                values=values if kind == "full" else {"messages": adds},
                metadata=metadata,
                next=next_nodes,
                created_at=stamp,
            )
        )
        changes: dict[str, Any] = {
            "values": values,
            "checkpoint_id": checkpoint_id,
            "updated_at": stamp,
        }
        await conn.execute(
            update(threads)
            .where(threads.c.tenant_id == tenant_id, threads.c.thread_id == thread_id)
            .values(**changes)
        )
        return checkpoint_id

    async def checkpoint(
        self, tenant_id: str, thread_id: str, checkpoint_id: str, *, values: bool = True
    ) -> dict[str, Any] | None:
        """One checkpoint of a thread; without ``values`` when the caller has them (the
        thread's current ones), which spares rebuilding them."""
        columns = checkpoints.c if values else _WITHOUT_VALUES
        async with self.auto.connect() as conn:
            result = await conn.execute(
                select(*columns).where(
                    checkpoints.c.tenant_id == tenant_id,
                    checkpoints.c.thread_id == thread_id,
                    checkpoints.c.checkpoint_id == checkpoint_id,
                )
            )
            found = row(result.mappings().first())
            if found is None or not values:
                return found
            await complete(conn, tenant_id, thread_id, [found])
            return found

    async def history(
        self,
        tenant_id: str,
        thread_id: str,
        *,
        limit: int = 10,
        before: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Checkpoints of a thread, newest first."""
        query = select(checkpoints).where(
            checkpoints.c.tenant_id == tenant_id, checkpoints.c.thread_id == thread_id
        )
        async with self.auto.connect() as conn:
            if before:
                stamp = await conn.scalar(
                    select(checkpoints.c.created_at).where(
                        checkpoints.c.tenant_id == tenant_id,
                        checkpoints.c.thread_id == thread_id,
                        checkpoints.c.checkpoint_id == before,
                    )
                )
                if stamp is not None:
                    query = query.where(checkpoints.c.created_at < stamp)
            query = query.order_by(checkpoints.c.created_at.desc(), checkpoints.c.step.desc())
            match = JsonMatch(self.engine.dialect.name, (checkpoints.c.metadata, metadata))
            found = await match.page(conn, query, limit, 0)
            await complete(conn, tenant_id, thread_id, found)
            return found
