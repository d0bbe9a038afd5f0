"""Migrations bring a database made by an earlier version up to date, keeping its rows."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, Table, inspect, text

from nimbus.store import schema
from nimbus.store.database import Database
from nimbus.store.db import create_engine

# Revision 0001 keyed threads and assistants by their id alone.
OLD_KEYS = {
    "threads": ["thread_id"],
    "assistants": ["assistant_id"],
    "assistant_versions": ["assistant_id", "version"],
}


def _revision_0001() -> MetaData:
    old = MetaData()
    for table in schema.metadata.sorted_tables:
        columns: list[Column[object]] = []
        for column in table.columns:
            copy = column._copy()
            copy.primary_key = False
            columns.append(copy)
        keys = OLD_KEYS.get(table.name) or [c.name for c in table.primary_key.columns]
        Table(table.name, old, *columns, PrimaryKeyConstraint(*keys))
    return old


async def test_ids_become_per_tenant_and_rows_survive(database_url: str) -> None:
    engine = create_engine(database_url)
    stamp = datetime(2026, 11, 22, tzinfo=UTC)
    async with engine.begin() as conn:
        await conn.run_sync(_revision_0001().create_all)
        await conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        await conn.execute(text("INSERT INTO alembic_version VALUES ('0001')"))
        await conn.execute(
            schema.threads.insert().values(
                thread_id="t-1",
                tenant_id="a",
                status="idle",
                metadata={"owner": "a"},
                values={"messages": []},
                checkpoint_id=None,
                created_at=stamp,
                updated_at=stamp,
            )
        )
    await engine.dispose()

    db = await Database.open(database_url)  # migrates to the newest revision
    try:
        async with db.engine.connect() as conn:
            keys = await conn.run_sync(
                lambda c: {
                    name: inspect(c).get_pk_constraint(name)["constrained_columns"]
                    for name in OLD_KEYS
                }
            )
        assert keys == {
            "threads": ["tenant_id", "thread_id"],
            "assistants": ["tenant_id", "assistant_id"],
            "assistant_versions": ["tenant_id", "assistant_id", "version"],
        }
        kept = await db.threads.get("a", "t-1")
        assert kept is not None and kept["metadata"] == {"owner": "a"}
        theirs, created = await db.threads.create("b", thread_id="t-1", metadata={})
        assert created and theirs["tenant_id"] == "b"
        assert (await db.threads.get("a", "t-1") or {}).get("metadata") == {"owner": "a"}
    finally:
        await db.close()
