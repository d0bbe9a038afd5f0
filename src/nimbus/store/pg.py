"""PostgreSQL's hot path: the statements every run makes, straight on asyncpg.

A run makes a dozen statements (queue it, claim it, read its thread, write each step). Through
SQLAlchemy each costs 150-300 µs of CPU in this process (building the statement, the pool's
checkout and reset, the result machinery); on a pool of plain asyncpg connections with
prepared statements it costs 30-50 µs. Everything else, and all of SQLite, goes through
SQLAlchemy; the tests run both paths against both databases.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from nimbus.store.common import ThreadBusy, new_id, now, pending_run

_THREAD = "SELECT * FROM threads WHERE tenant_id = $1 AND thread_id = $2"
_ASSISTANT = "SELECT * FROM assistants WHERE tenant_id = $1 AND assistant_id = $2"
_CLAIM = """
WITH r AS (
    UPDATE runs SET status = 'running', attempts = attempts + 1, updated_at = $2
    WHERE run_id = $1 AND status IN ('pending', 'running')
    RETURNING *
), t AS (
    UPDATE threads SET status = 'busy', updated_at = $2
    FROM r WHERE threads.thread_id = r.thread_id AND threads.tenant_id = r.tenant_id
    RETURNING threads.thread_id, threads."values", threads.checkpoint_id
)
SELECT r.*, t.thread_id IS NOT NULL AS thread_found, t."values" AS thread_values,
       t.checkpoint_id AS thread_checkpoint_id
FROM r LEFT JOIN t ON true
"""
_QUEUE = "SELECT nimbus_queue_run($1, $2, $3, $4, $5, $6, $7, $8)"  # migration 0002
BUSY_STATE = "NB409"  # the SQLSTATE nimbus_queue_run raises for a busy thread (reject)


def dsn(url: str) -> str:
    """The libpq-style URL asyncpg takes, from any SQLAlchemy PostgreSQL URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _setup(conn: asyncpg.Connection) -> None:
    """JSON columns in and out as Python values, through orjson. Binary format: arrays of
    jsonb (the step writes) are then sent element by element, never as array literals."""
    from nimbus.store.db import dump_json, load_json

    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: b"\x01" + dump_json(value).encode(),
        decoder=lambda data: load_json(data[1:]),
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "json",
        encoder=lambda value: dump_json(value).encode(),
        decoder=load_json,
        schema="pg_catalog",
        format="binary",
    )


class PgHotPath:
    """The per-run statements on a pool of asyncpg connections."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, url: str, size: int) -> PgHotPath:
        """A pool of up to ``size`` connections to ``url``."""
        pool = await asyncpg.create_pool(
            dsn(url),
            min_size=0,  # no background reconnecting (and logging) while the server is down
            max_size=size,
            init=_setup,
            max_inactive_connection_lifetime=300,
            # The statements here are key lookups and batch writes, one good plan each: plan
            # them once per connection, not at every execution.
            server_settings={"plan_cache_mode": "force_generic_plan"},
        )
        return cls(pool)

    async def close(self) -> None:
        """Close every connection."""
        await self.pool.close()

    async def thread(self, tenant_id: str, thread_id: str) -> dict[str, Any] | None:
        """One thread of the tenant, or None."""
        found = await self.pool.fetchrow(_THREAD, tenant_id, thread_id)
        return None if found is None else dict(found)

    async def assistant(self, tenant_id: str, assistant_id: str) -> dict[str, Any] | None:
        """One assistant of the tenant by id, or None."""
        found = await self.pool.fetchrow(_ASSISTANT, tenant_id, assistant_id)
        return None if found is None else dict(found)

    async def claim(self, run_id: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """See :meth:`nimbus.store.runs.RunStore.claim`."""
        found = await self.pool.fetchrow(_CLAIM, run_id, now())
        if found is None:
            return None
        run = dict(found)
        thread_found = run.pop("thread_found")
        thread = {
            "thread_id": run["thread_id"],
            "values": run.pop("thread_values"),
            "checkpoint_id": run.pop("thread_checkpoint_id"),
        }
        return run, thread if thread_found else None

    async def queue_run(
        self,
        tenant_id: str,
        thread_id: str,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
    ) -> dict[str, Any] | None:
        """Queue a run on an existing thread (see :meth:`RunStore.create`); None when the
        tenant has no such thread."""
        stamp, run_id = now(), new_id()
        try:
            active = await self.pool.fetchval(
                _QUEUE,
                run_id,
                tenant_id,
                thread_id,
                assistant_id,
                metadata,
                kwargs,
                multitask_strategy,
                stamp,
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == BUSY_STATE:
                raise ThreadBusy(thread_id) from None
            raise
        if active is None:
            return None
        run = pending_run(
            run_id, tenant_id, thread_id, assistant_id, kwargs, metadata, multitask_strategy, stamp
        )
        if active:
            run["interrupted_runs"] = active
        return run
