"""Runs and their events, per tenant. The runs table is also the durable queue."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store.common import (
    JsonMatch,
    insert_new,
    now,
    row,
)
from nimbus.adapters.store.engine import autocommit
from nimbus.adapters.store.postgres_runs import PostgresRuns
from nimbus.adapters.store.postgres_runs import queue_in as postgres_queue_in
from nimbus.adapters.store.quota import queue_full
from nimbus.adapters.store.schema import idempotency_keys, run_attempts, run_events, runs
from nimbus.adapters.store.sqlite_runs import SqliteRuns
from nimbus.adapters.store.sqlite_runs import queue_in as sqlite_queue_in
from nimbus.adapters.store.threads import create_thread
from nimbus.exceptions import IdempotencyConflict, QueueFull
from nimbus.records import ACTIVE, ClaimedRun, Queued, Run, new_id


def _queue(
    conn: Connection,
    tenant_id: str,
    thread_id: str | None,
    assistant_id: str,
    kwargs: dict[str, Any],
    metadata: dict[str, Any],
    multitask_strategy: str,
    if_not_exists: str,
    temporary: bool,
    idempotency: tuple[str, str] | None,
    claim_as: str | None,
) -> Queued | None:
    """:meth:`RunStore.create`'s general path inside a transaction (synchronous, for
    ``run_sync``: one greenlet for the whole transaction): the Idempotency-Key taken, the
    thread made when it must be, then the run queued by the database's one form of the rule
    (``queue_in`` of :mod:`~nimbus.adapters.store.sqlite_runs` or
    :mod:`~nimbus.adapters.store.postgres_runs`)."""
    run_id = new_id()
    if idempotency is not None:
        replayed = _claim_key(conn, tenant_id, *idempotency, run_id)
        if replayed is not None:
            return replayed
    if thread_id is None:
        metadata_of_thread = {"temporary": True} if temporary else {}
        thread, _ = create_thread(conn, tenant_id, None, metadata_of_thread, status="busy")
        thread_id = thread["thread_id"]
    elif if_not_exists == "create":
        create_thread(conn, tenant_id, thread_id, {}, status="busy")  # or one made meanwhile
    queue_in = postgres_queue_in if conn.dialect.name == "postgresql" else sqlite_queue_in
    return queue_in(
        conn,
        run_id,
        tenant_id,
        thread_id,
        assistant_id,
        kwargs,
        metadata,
        multitask_strategy,
        claim_as,
    )


def _claim_key(
    conn: Connection, tenant_id: str, key: str, request_hash: str, run_id: str
) -> Queued | None:
    """Take an Idempotency-Key for ``run_id``; if the tenant used it before for the same
    request, return that run (``replayed``) instead. The key's row is written first:
    of concurrent requests with one key, the others wait for the first to commit."""
    table = idempotency_keys
    stamp = now()
    taken = conn.execute(
        insert_new(conn.dialect.name, table).values(
            tenant_id=tenant_id, key=key, request_hash=request_hash, run_id=run_id, created_at=stamp
        )
    )
    if taken.rowcount:
        return None
    of_key = (table.c.tenant_id == tenant_id, table.c.key == key)
    earlier = conn.execute(select(table.c.request_hash, table.c.run_id).where(*of_key)).one()
    if earlier.request_hash != request_hash:
        raise IdempotencyConflict(key)
    run = row(conn.execute(select(runs).where(runs.c.run_id == earlier.run_id)).mappings().first())
    if run is not None:
        return Queued(cast(Run, run), replayed=True)
    # its run was deleted since: the key is free again
    conn.execute(update(table).where(*of_key).values(run_id=run_id, created_at=stamp))
    return None


@contextlib.contextmanager
def _refused_when_full(tenant_id: str) -> Iterator[None]:
    """The database refusing a run of a tenant whose queue is full, as :class:`QueueFull`."""
    try:
        yield
    except Exception as exc:
        if queue_full(exc):
            raise QueueFull(tenant_id) from None
        raise


class RunStore:
    """Queries on runs and run events; every method is scoped by ``tenant_id``."""

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

    async def create(
        self,
        tenant_id: str,
        *,
        thread_id: str | None,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        if_not_exists: str = "reject",
        temporary: bool = False,
        idempotency: tuple[str, str] | None = None,
        claim_as: str | None = None,
    ) -> Queued | None:
        """Queue a run. Returns None if the thread does not exist (and may not be created).

        Raises :class:`ThreadBusy` when the thread has an active run and the strategy is
        ``reject``. With ``interrupt``/``rollback`` the active runs are marked for
        interruption (the worker sees the status change and stops).

        ``idempotency`` is ``(key, request hash)``: the same key with the same request returns
        the run made the first time (with ``replayed: True``); with another request it raises
        :class:`IdempotencyConflict`.

        ``claim_as`` (a worker of this process, with a slot reserved for the run): a run on
        an existing thread that can start at once is claimed by that worker as it is queued,
        in the same transaction; it comes back ``running`` (on PostgreSQL with its lease),
        ``claimed``, with its thread. Otherwise it comes back ``pending``.

        Raises :class:`QueueFull` when the tenant has as many runs waiting as it may (a rule
        of the database: :mod:`nimbus.adapters.store.quota`).
        """
        with _refused_when_full(tenant_id):
            return await self._create(
                tenant_id,
                thread_id,
                assistant_id,
                kwargs,
                metadata,
                multitask_strategy,
                if_not_exists,
                temporary,
                idempotency,
                claim_as,
            )

    async def _create(
        self,
        tenant_id: str,
        thread_id: str | None,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        if_not_exists: str,
        temporary: bool,
        idempotency: tuple[str, str] | None,
        claim_as: str | None,
    ) -> Queued | None:
        if self.pg_runs is not None and thread_id is None and idempotency is None:
            return await self.pg_runs.queue_stateless_run(
                tenant_id,
                assistant_id,
                kwargs,
                metadata,
                multitask_strategy,
                {"temporary": True} if temporary else {},
            )
        hot = self.pg_runs or self.sqlite_runs
        if hot is not None and thread_id is not None and idempotency is None:
            queued = await hot.queue_run(
                tenant_id, thread_id, assistant_id, kwargs, metadata, multitask_strategy, claim_as
            )
            if queued is not None:
                return queued  # else no such thread: the general path below decides
        async with self.engine.begin() as conn:
            return await conn.run_sync(
                _queue,
                tenant_id,
                thread_id,
                assistant_id,
                kwargs,
                metadata,
                multitask_strategy,
                if_not_exists,
                temporary,
                idempotency,
                claim_as,
            )

    async def create_with_assistant(
        self,
        tenant_id: str,
        *,
        thread_id: str,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        claim_as: str | None = None,
    ) -> Queued | None:
        """:meth:`create` on an existing thread, reading the tenant's assistant in the same
        transaction (on PostgreSQL: in the same round trip), as the result's ``assistant``.
        ``assistant_id`` names it by id, graph or name, as
        :meth:`~nimbus.adapters.store.assistants.AssistantStore.find` resolves them; the run is
        queued for that assistant's id. None, with nothing queued, when the thread or the
        assistant is missing (then :meth:`create` decides: it may create the thread, or a
        graph's system assistant)."""
        hot = self.pg_runs or self.sqlite_runs
        assert hot is not None, "a database is PostgreSQL or SQLite"
        with _refused_when_full(tenant_id):
            return await hot.queue_run(
                tenant_id,
                thread_id,
                assistant_id,
                kwargs,
                metadata,
                multitask_strategy,
                claim_as,
                with_assistant=True,
            )

    async def get(
        self, tenant_id: str, run_id: str, thread_id: str | None = None
    ) -> dict[str, Any] | None:
        """One run (of the thread, if given), or None."""
        if self.pg_runs is not None and thread_id is None:
            return await self.pg_runs.run(tenant_id, run_id)
        query = select(runs).where(runs.c.tenant_id == tenant_id, runs.c.run_id == run_id)
        if thread_id is not None:
            query = query.where(runs.c.thread_id == thread_id)
        async with self.auto.connect() as conn:
            return row((await conn.execute(query)).mappings().first())

    async def get_any(self, run_id: str) -> Run | None:
        """A run by id whatever its tenant (for the worker, never for a request)."""
        async with self.auto.connect() as conn:
            found = (await conn.execute(select(runs).where(runs.c.run_id == run_id))).mappings()
            return cast(Run | None, row(found.first()))

    async def of_thread(
        self,
        tenant_id: str,
        thread_id: str,
        *,
        limit: int = 10,
        offset: int = 0,
        status: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Runs of a thread, newest first."""
        query = select(runs).where(runs.c.tenant_id == tenant_id, runs.c.thread_id == thread_id)
        if status:
            query = query.where(runs.c.status == status)
        query = query.order_by(runs.c.created_at.desc())
        match = JsonMatch(self.engine.dialect.name, (runs.c.metadata, metadata))
        async with self.auto.connect() as conn:
            return await match.page(conn, query, limit, offset)

    async def delete(self, tenant_id: str, run_id: str, thread_id: str | None = None) -> bool:
        """Delete a finished run and its events; False if not found."""
        query = delete(runs).where(runs.c.tenant_id == tenant_id, runs.c.run_id == run_id)
        if thread_id is not None:
            query = query.where(runs.c.thread_id == thread_id)
        async with self.engine.begin() as conn:
            result = await conn.execute(query)
            await conn.execute(delete(run_events).where(run_events.c.run_id == run_id))
            await conn.execute(delete(run_attempts).where(run_attempts.c.run_id == run_id))
        return bool(result.rowcount)

    async def delete_of_assistant(self, tenant_id: str, assistant_id: str) -> int:
        """Delete the ended runs of an assistant, with their events and attempts (as
        LangGraph does when the assistant is deleted); how many."""
        of_it = (runs.c.tenant_id == tenant_id, runs.c.assistant_id == assistant_id)
        ended = select(runs.c.run_id).where(*of_it, runs.c.status.not_in(ACTIVE))
        async with self.engine.begin() as conn:
            ids = list((await conn.execute(ended)).scalars())
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                await conn.execute(delete(run_events).where(run_events.c.run_id.in_(chunk)))
                await conn.execute(delete(run_attempts).where(run_attempts.c.run_id.in_(chunk)))
                await conn.execute(delete(runs).where(*of_it, runs.c.run_id.in_(chunk)))
        return len(ids)

    async def cancel(self, tenant_id: str, run_id: str, thread_id: str | None, action: str) -> bool:
        """Mark an active run interrupted (the worker stops it); False if not found."""
        query = update(runs).where(
            runs.c.tenant_id == tenant_id, runs.c.run_id == run_id, runs.c.status.in_(ACTIVE)
        )
        if thread_id is not None:
            query = query.where(runs.c.thread_id == thread_id)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                query.values(status="interrupted", error=f"cancelled ({action})", updated_at=now())
            )
            if not result.rowcount:
                found = await conn.scalar(
                    select(runs.c.run_id).where(
                        runs.c.tenant_id == tenant_id, runs.c.run_id == run_id
                    )
                )
                return found is not None
        return True

    async def cancel_many(
        self,
        tenant_id: str,
        action: str,
        *,
        run_ids: list[str] | None = None,
        thread_id: str | None = None,
        assistant_id: str | None = None,
        statuses: tuple[str, ...] = ACTIVE,
    ) -> list[str]:
        """Mark a tenant's active runs interrupted: those of ``run_ids`` (of ``thread_id``, if
        given), else all with one of ``statuses`` (of ``assistant_id``, if given); returns
        their ids."""
        query = update(runs).where(runs.c.tenant_id == tenant_id, runs.c.status.in_(statuses))
        if run_ids is not None:
            query = query.where(runs.c.run_id.in_(run_ids))
        if thread_id is not None:
            query = query.where(runs.c.thread_id == thread_id)
        if assistant_id is not None:
            query = query.where(runs.c.assistant_id == assistant_id)
        values = {"status": "interrupted", "error": f"cancelled ({action})", "updated_at": now()}
        async with self.engine.begin() as conn:
            found = await conn.execute(query.values(**values).returning(runs.c.run_id))
            return list(found.scalars())

    async def unfinished(self) -> list[Run]:
        """Runs that were queued or running (to resume after a restart), oldest first."""
        async with self.auto.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        select(runs).where(runs.c.status.in_(ACTIVE)).order_by(runs.c.created_at)
                    )
                )
                .mappings()
                .all()
            )
        return [cast(Run, r) for r in map(row, rows) if r]

    async def attempts(self, tenant_id: str, run_id: str) -> list[dict[str, Any]]:
        """The attempts at a run: number, the worker that claimed it and when."""
        query = (
            select(run_attempts.c.attempt, run_attempts.c.worker, run_attempts.c.claimed_at)
            .where(run_attempts.c.tenant_id == tenant_id, run_attempts.c.run_id == run_id)
            .order_by(run_attempts.c.attempt)
        )
        async with self.auto.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def ended(self, run_id: str) -> bool:
        """Whether a run is over: not pending or running, and no worker holds it any more (a
        run cancelled from elsewhere is ``interrupted`` at once, but ends when its worker has
        written its end). A run that does not exist is over too."""
        if self.pg_runs is not None:
            state = await self.pg_runs.run_state(run_id)
            return state is None or (state[0] not in ACTIVE and state[1] is None)
        async with self.auto.connect() as conn:
            found = (
                await conn.execute(
                    select(runs.c.status, runs.c.lease_owner).where(runs.c.run_id == run_id)
                )
            ).first()
        return found is None or (found.status not in ACTIVE and found.lease_owner is None)

    async def status(self, run_id: str) -> str | None:
        """The current status of a run."""
        async with self.auto.connect() as conn:
            return await conn.scalar(select(runs.c.status).where(runs.c.run_id == run_id))

    async def last_seq(self, run_id: str) -> int:
        """The highest stored event number of a run (-1 if none)."""
        async with self.auto.connect() as conn:
            found = await conn.scalar(
                select(func.max(run_events.c.seq)).where(run_events.c.run_id == run_id)
            )
        return -1 if found is None else int(found)

    async def claim(self, run_id: str, owner: str = "") -> ClaimedRun | None:
        """Claim a pending (or resumed) run for execution: the run becomes running with one
        more attempt, its thread busy (again: a run that ended meanwhile may have set it
        idle). Returns the run and its thread (None if the thread was deleted), or None when
        the run is no longer active (cancelled or finished meanwhile).

        On PostgreSQL the claim is a lease for ``owner`` (a worker, alive while its heartbeat
        is), and the run's ``lease_token`` is the fencing token its step writes must carry; a
        run whose thread has another run in progress is not claimable yet (None)."""
        if self.pg_runs is not None:
            return await self.pg_runs.claim(run_id, owner)
        assert self.sqlite_runs is not None, "a database is PostgreSQL or SQLite"
        return await self.sqlite_runs.claim(run_id)

    async def events(self, run_id: str, after: int = -1) -> list[tuple[int, str, Any]]:
        """Stored events of a run with ``seq > after``, in order."""
        async with self.auto.connect() as conn:
            rows = (
                await conn.execute(
                    select(run_events.c.seq, run_events.c.event, run_events.c.data)
                    .where(run_events.c.run_id == run_id, run_events.c.seq > after)
                    .order_by(run_events.c.seq)
                )
            ).all()
        return [(r.seq, r.event, r.data) for r in rows]
