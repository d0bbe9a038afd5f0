"""Database connections: a URL (:class:`~nimbus.adapters.store.url.DatabaseURL`) in, the
right async driver chosen here, migrations at start.

``sqlite:///path.db`` → SQLAlchemy's aiosqlite dialect over an in-loop connection
(:mod:`nimbus.adapters.store.sqlite_connection`), ``postgresql://user@host/db`` → asyncpg.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from nimbus.adapters.store.sqlite_connection import in_loop_creator
from nimbus.adapters.store.url import DatabaseURL
from nimbus.records import dump_json, load_json

MIGRATIONS = Path(__file__).parent / "migrations"


# Network errors of a database connection that is refused, reset or unreachable.
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ETIMEDOUT,
    errno.EPIPE,
}


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached (down, restarting, connection
    lost) rather than that a statement or a request was wrong: a 503, not a 500."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            return True
        return exc.orig is not None and unavailable(exc.orig)
    state = getattr(exc, "sqlstate", None)  # asyncpg's errors from PostgreSQL
    if isinstance(state, str):
        # class 08: connection exception; 57P01-57P03: shutting down, cannot connect now
        return state.startswith("08") or state in ("57P01", "57P02", "57P03")
    if isinstance(exc, ConnectionError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _NETWORK_ERRNOS or "Connect call failed" in str(exc)
    return False


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_engine(
    url: str | DatabaseURL, *, pool_size: int = 20, session: dict[str, str] | None = None
) -> AsyncEngine:
    """An async engine for ``url``, JSON columns (de)serialised by orjson.

    SQLite (WAL mode, run on the event loop's thread) gets a single connection: SQLite runs
    one writer at a time anyway, and one connection shared in turn never fails with
    "database is locked" under load, as several connections upgrading their transactions to
    writers at once would. PostgreSQL
    gets a pool; a connection the server dropped is detected on use and replaced (no ping
    before every checkout, which would cost a round trip per query). ``session``: PostgreSQL
    settings of every connection (the rules of :mod:`nimbus.adapters.store.quota` read them).
    """
    parsed = url if isinstance(url, DatabaseURL) else DatabaseURL.parse(url)
    target = parsed.for_sqlalchemy
    json = {"json_serializer": dump_json, "json_deserializer": load_json}
    if parsed.kind == "sqlite":
        if parsed.path:
            Path(parsed.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            target,
            async_creator=in_loop_creator(parsed.path or ":memory:"),
            # A queue of one, also for a database in memory (which SQLAlchemy would give a
            # StaticPool, shared without turns): it lives as long as that one connection.
            poolclass=AsyncAdaptedQueuePool,
            pool_size=1,
            max_overflow=0,
            pool_timeout=60,
            **json,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        target,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        # JIT off: short statements, never worth compiling
        connect_args={"server_settings": {"jit": "off", **(session or {})}},
        **json,
    )


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """``engine`` for reads and single-statement writes: on PostgreSQL in autocommit mode, so
    such a statement costs one round trip (no BEGIN and COMMIT/ROLLBACK around it)."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def _upgrade(connection: Any) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


MIGRATION_LOCK = 0x6E696D627573  # "nimbus": the advisory lock of migrations on PostgreSQL


async def migrate(engine: AsyncEngine) -> None:
    """Apply every Alembic migration that has not run yet. On PostgreSQL, processes starting
    together take turns (a transaction-scoped advisory lock): the first migrates, the others
    then find nothing to do."""
    from sqlalchemy import text

    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        await conn.run_sync(_upgrade)


async def ping(conn: AsyncConnection) -> None:
    """Check the connection answers."""
    from sqlalchemy import text

    await conn.execute(text("SELECT 1"))
