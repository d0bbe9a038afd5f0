"""SQLite's WAL checkpoints: a thread of their own, SQLite's own only as a backstop."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from nimbus.adapters.store.database import Database
from nimbus.adapters.store.sqlite_connection import WalCheckpointer


def _autocheckpoint(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])


async def test_every_connection_leaves_checkpoints_to_the_thread(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite:///{tmp_path}/nimbus.db")
    try:
        assert db.sqlite_runs is not None and db.checkpointer is not None
        assert await db.sqlite_runs.use(_autocheckpoint) == WalCheckpointer.BACKSTOP_PAGES
        await db.engine.dispose()  # the pool's connection is replaced by a new one
        assert await db.sqlite_runs.use(_autocheckpoint) == WalCheckpointer.BACKSTOP_PAGES
        await db.threads.create("t", thread_id=None, metadata={})
        for _ in range(100):
            if db.checkpointer.checkpoints:
                break
            await asyncio.sleep(0.05)
        assert db.checkpointer.checkpoints > 0
    finally:
        await db.close()
    assert not db.checkpointer._thread.is_alive()
