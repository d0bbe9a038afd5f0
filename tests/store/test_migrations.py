"""Migrations bring a database made by an earlier version up to date, keeping its rows."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, Table, inspect, text

from nimbus.adapters.store import schema
from nimbus.adapters.store.database import Database
from nimbus.adapters.store.engine import create_engine

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


def _revision_0008() -> MetaData:
    """The tables of revision 0008 (without indexes): checkpoints have no kind and no seq."""
    old = MetaData()
    added = {("checkpoints", "kind"), ("checkpoints", "seq")}
    for table in schema.metadata.sorted_tables:
        columns = [c._copy() for c in table.columns if (table.name, c.name) not in added]
        Table(table.name, old, *columns)
    return old


async def test_checkpoints_of_revision_0008_stay_whole(database_url: str) -> None:
    engine = create_engine(database_url)
    stamp = datetime(2026, 12, 1, tzinfo=UTC)
    values = {"messages": [{"type": "human", "content": "hi", "id": "m-0"}]}
    async with engine.begin() as conn:
        await conn.run_sync(_revision_0008().create_all)
        await conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        await conn.execute(text("INSERT INTO alembic_version VALUES ('0008')"))
        await conn.execute(
            text(
                "INSERT INTO checkpoints (checkpoint_id, tenant_id, thread_id, parent_id, "
                'run_id, step, "values", metadata, next, created_at) '
                "VALUES ('c-1', 'a', 't-1', NULL, NULL, 0, :values, '{}', '[]', :stamp)"
            ),
            {"values": orjson.dumps(values).decode(), "stamp": stamp},
        )
    await engine.dispose()

    db = await Database.open(database_url)  # migrates to the newest revision
    try:
        async with db.engine.connect() as conn:
            query = text("SELECT kind, seq FROM checkpoints WHERE checkpoint_id = 'c-1'")
            stored = (await conn.execute(query)).one()
        assert tuple(stored) == ("full", None)
        found = await db.threads.checkpoint("a", "t-1", "c-1")
        assert found is not None and found["values"] == values
    finally:
        await db.close()
