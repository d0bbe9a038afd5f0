"""One handle on the database: the engine and a store per resource."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store import quota
from nimbus.adapters.store.assistants import AssistantStore
from nimbus.adapters.store.engine import create_engine, migrate, unavailable
from nimbus.adapters.store.items import ItemStore
from nimbus.adapters.store.keys import KeyStore
from nimbus.adapters.store.postgres_runs import PostgresRuns
from nimbus.adapters.store.runs import RunStore
from nimbus.adapters.store.sqlite_connection import WalCheckpointer
from nimbus.adapters.store.sqlite_runs import SqliteRuns
from nimbus.adapters.store.threads import ThreadStore
from nimbus.adapters.store.url import DatabaseURL
from nimbus.adapters.store.writer import StepWriter


class Database:
    """The engine plus the assistant, thread, run, item and key stores."""

    def __init__(self, engine: AsyncEngine, pg_runs: PostgresRuns | None = None) -> None:
        self.engine = engine
        self.pg_runs = pg_runs
        #: SQLite's per-run statements (PostgreSQL's are ``pg_runs``)
        self.sqlite_runs = SqliteRuns(engine) if engine.dialect.name == "sqlite" else None
        self.assistants = AssistantStore(engine, pg_runs, self.sqlite_runs)
        self.threads = ThreadStore(engine, pg_runs)
        self.runs = RunStore(engine, pg_runs, self.sqlite_runs)
        self.items = ItemStore(engine)
        self.keys = KeyStore(engine)
        self.steps = StepWriter(engine, pg_runs, self.sqlite_runs)
        self.checkpointer: WalCheckpointer | None = None  # SQLite in a file

    @property
    def queue(self) -> PostgresRuns | None:
        """The run queue that worker processes share (PostgreSQL); None on SQLite, whose
        runs are queued in the one process that serves it."""
        return self.pg_runs

    @staticmethod
    def unavailable(exc: BaseException) -> bool:
        """Whether ``exc`` says the database cannot be reached (see :func:`unavailable`)."""
        return unavailable(exc)

    @classmethod
    async def open(
        cls,
        url: str | DatabaseURL,
        *,
        run_migrations: bool = True,
        pool_size: int = 20,
        tenant_max_queued: int | None = None,
    ) -> Database:
        """Connect to ``url`` and bring its schema up to date. PostgreSQL also gets the
        asyncpg pool of the per-run statements (:mod:`nimbus.adapters.store.postgres_runs`);
        SQLite runs them on its raw connection (:mod:`nimbus.adapters.store.sqlite_runs`).
        ``tenant_max_queued``: the most runs a tenant may have waiting, enforced by the
        database (:mod:`nimbus.adapters.store.quota`)."""
        parsed = url if isinstance(url, DatabaseURL) else DatabaseURL.parse(url)
        cap = tenant_max_queued
        session = {quota.SETTING: str(cap)} if cap is not None else None
        engine = create_engine(parsed, pool_size=pool_size, session=session)
        checkpointer = None
        path = parsed.path
        if path is not None:
            # checkpoints of the log off the event loop (see WalCheckpointer), SQLite's own
            # only as a backstop: on every connection the engine opens, from the first one
            checkpointer = WalCheckpointer(path)
            event.listen(engine.sync_engine, "connect", checkpointer.configure)
        if cap is not None and parsed.kind == "sqlite":
            event.listen(engine.sync_engine, "connect", functools.partial(_cap, cap))
        if run_migrations:
            await migrate(engine)
        pg_runs = None
        if parsed.kind == "postgresql":
            pg_runs = await PostgresRuns.open(parsed.dsn, pool_size, session)
        elif cap is not None:  # the connection made before the migrations made the table
            async with engine.begin() as conn:
                await conn.exec_driver_sql(quota.sqlite_trigger(cap))
        database = cls(engine, pg_runs)
        if checkpointer is not None:
            database.checkpointer = checkpointer
            checkpointer.start()
        return database

    async def close(self) -> None:
        """Finish queued step writes, then close every connection."""
        await self.steps.close()
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.stop)
        if self.pg_runs is not None:
            await self.pg_runs.close()
        await self.engine.dispose()


def _cap(cap: int, dbapi_connection: Any, _record: Any) -> None:
    """Each SQLite connection the engine opens gets the queue cap (a TEMP trigger)."""
    cursor = dbapi_connection.cursor()
    try:
        quota.install_sqlite(cursor, cap)
    finally:
        cursor.close()
