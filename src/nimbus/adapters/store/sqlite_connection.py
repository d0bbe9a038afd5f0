"""SQLite for the async engine, run on the event loop's own thread.

An SQLite statement of this server takes 5-50 µs; aiosqlite hands each call (execute, fetch,
close, commit) to its own thread and back, which costs 100-300 µs of CPU per statement and a
thread switch each way. :class:`InLoopConnection` has aiosqlite's interface but makes the
calls in place; SQLAlchemy's aiosqlite dialect drives it through ``async_creator``.

The engine holds one such connection (see
:func:`nimbus.adapters.store.engine.create_engine`), so the
process never contends with itself for SQLite's lock; a statement can only wait, up to the
busy timeout, while another process (``nimbus keys create``) writes. SQLite is the embedded,
one-process setup; several servers share PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

import structlog

log = structlog.get_logger("nimbus.adapters.store")


class InLoopCursor:
    """An aiosqlite-style cursor whose coroutines finish at once."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> InLoopCursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = None) -> InLoopCursor:
        if parameters is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Any) -> InLoopCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> Sequence[Any]:
        return self._cursor.fetchall()

    async def nextset(self) -> None:
        return None

    async def setinputsizes(self, *_: Any) -> None:
        return None

    async def close(self) -> None:
        self._cursor.close()


class InLoopConnection:
    """The part of ``aiosqlite.Connection`` SQLAlchemy uses, over a plain sqlite3
    connection used only from the event loop's thread."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection: sqlite3.Connection | None = connection

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("no active connection")
        return self._connection

    @property
    def raw(self) -> sqlite3.Connection:
        """The sqlite3 connection itself (see :mod:`nimbus.adapters.store.sqlite_runs`)."""
        return self._conn

    def is_open(self) -> bool:
        """Whether it was not closed."""
        return self._connection is not None

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> InLoopCursor:
        return InLoopCursor(self._conn.cursor())

    async def execute(self, sql: str, parameters: Any = None) -> InLoopCursor:
        return await self.cursor().execute(sql, parameters)

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def stop(self) -> None:
        """Close at once (SQLAlchemy's terminate)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def in_loop_creator(path: str) -> Any:
    """An ``async_creator`` for :func:`sqlalchemy.ext.asyncio.create_async_engine`."""

    async def connect() -> InLoopConnection:
        # check_same_thread stays on: only the event loop's thread ever uses it.
        return InLoopConnection(sqlite3.connect(path, uri=path.startswith("file:")))

    return connect


class WalCheckpointer:
    """Copies SQLite's write-ahead log back into the database file from a thread of its own.

    SQLite does it itself inside whichever commit takes the log past 1,000 pages: that commit
    then writes and syncs the database file, which takes milliseconds on the event loop's
    thread (and on this server's commit path, up to tens of milliseconds). Here a thread does
    it every ``interval_s`` in PASSIVE mode, which never waits for, nor holds up, the
    server's connection. SQLite's own checkpoint stays as a safety net, at a much larger log
    (``BACKSTOP_PAGES``), should this thread fall behind.
    """

    BACKSTOP_PAGES = 20_000  # 80 MB of log with 4 KiB pages

    def __init__(self, path: str, interval_s: float = 0.5) -> None:
        self.path = path
        self.interval_s = interval_s
        self.checkpoints = 0  #: checkpoints done
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="nimbus-wal-checkpoints", daemon=True
        )

    def configure(self, dbapi_connection: Any, _record: Any = None) -> None:
        """Leave SQLite's own checkpoints to the backstop on a connection (a SQLAlchemy
        ``connect`` listener)."""
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA wal_autocheckpoint={self.BACKSTOP_PAGES}")
        cursor.close()

    def start(self) -> None:
        """Start checkpointing."""
        self._thread.start()

    def stop(self) -> None:
        """Checkpoint one last time and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        conn = sqlite3.connect(self.path)
        try:
            while True:
                stopping = self._stop.wait(self.interval_s)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # busy or gone: the next round tries again
                    log.warning("store.wal_checkpoint_failed", error=str(exc))
                if stopping:
                    return
        finally:
            conn.close()
