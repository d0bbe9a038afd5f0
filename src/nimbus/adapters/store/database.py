"""One handle on the database: the engine and a store per resource."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.adapters.store import quota
from nimbus.adapters.store.assistants import AssistantStore
from nimbus.adapters.store.db import create_engine, in_memory, migrate, unavailable
from nimbus.adapters.store.items import ItemStore
from nimbus.adapters.store.keys import KeyStore
from nimbus.adapters.store.pg import PgHotPath
from nimbus.adapters.store.runs import RunStore
from nimbus.adapters.store.sqlite import WalCheckpointer
from nimbus.adapters.store.sqlite_fast import SqliteHotPath
from nimbus.adapters.store.threads import ThreadStore
from nimbus.adapters.store.writer import StepWriter


class Database:
    """The engine plus the assistant, thread, run, item and key stores."""

    def __init__(self, engine: AsyncEngine, fast: PgHotPath | None = None) -> None:
        self.engine = engine
        self.fast = fast
        #: SQLite's per-run statements (PostgreSQL's are ``fast``)
        self.lite = SqliteHotPath(engine) if engine.dialect.name == "sqlite" else None
        self.assistants = AssistantStore(engine, fast, self.lite)
        self.threads = ThreadStore(engine, fast)
        self.runs = RunStore(engine, fast, self.lite)
        self.items = ItemStore(engine)
        self.keys = KeyStore(engine)
        self.steps = StepWriter(engine, fast, self.lite)
        self.checkpointer: WalCheckpointer | None = None  # SQLite in a file

    @property
    def queue(self) -> PgHotPath | None:
        """The run queue that worker processes share (PostgreSQL); None on SQLite, whose
        runs are queued in the one process that serves it."""
        return self.fast

    @staticmethod
    def unavailable(exc: BaseException) -> bool:
        """Whether ``exc`` says the database cannot be reached (see :func:`unavailable`)."""
        return unavailable(exc)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        run_migrations: bool = True,
        pool_size: int = 20,
        tenant_max_queued: int | None = None,
    ) -> Database:
        """Connect to ``url`` and bring its schema up to date. PostgreSQL also gets the
        asyncpg pool of the per-run statements (:mod:`nimbus.adapters.store.pg`); SQLite runs
        them on its raw connection (:mod:`nimbus.adapters.store.sqlite_fast`).
        ``tenant_max_queued``: the most runs a tenant may have waiting, enforced by the
        database (:mod:`nimbus.adapters.store.quota`)."""
        cap = tenant_max_queued
        session = {quota.SETTING: str(cap)} if cap is not None else None
        engine = create_engine(url, pool_size=pool_size, session=session)
        checkpointer = None
        path = engine.url.database
        if engine.dialect.name == "sqlite" and path and not in_memory(url):
            # checkpoints of the log off the event loop (see WalCheckpointer), SQLite's own
            # only as a backstop: on every connection the engine opens, from the first one
            checkpointer = WalCheckpointer(path)
            event.listen(engine.sync_engine, "connect", checkpointer.configure)
        if cap is not None and engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", functools.partial(_cap, cap))
        if run_migrations:
            await migrate(engine)
        fast = None
        if engine.dialect.name == "postgresql":
            fast = await PgHotPath.open(url, pool_size, session)
        elif cap is not None:  # the connection made before the migrations made the table
            async with engine.begin() as conn:
                await conn.exec_driver_sql(quota.sqlite_trigger(cap))
        database = cls(engine, fast)
        if checkpointer is not None:
            database.checkpointer = checkpointer
            checkpointer.start()
        return database

    async def close(self) -> None:
        """Finish queued step writes, then close every connection."""
        await self.steps.close()
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.stop)
        if self.fast is not None:
            await self.fast.close()
        await self.engine.dispose()


def _cap(cap: int, dbapi_connection: Any, _record: Any) -> None:
    """Each SQLite connection the engine opens gets the queue cap (a TEMP trigger)."""
    cursor = dbapi_connection.cursor()
    try:
        quota.install_sqlite(cursor, cap)
    finally:
        cursor.close()
