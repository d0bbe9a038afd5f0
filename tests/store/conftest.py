"""Fixtures of the store tests: a migrated database (SQLite and PostgreSQL) and helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nimbus.adapters.store.database import Database


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated database: SQLite, then PostgreSQL (see ``database_url``)."""
    database = await Database.open(database_url)
    try:
        yield database
    finally:
        await database.close()


async def new_assistant(db: Database, tenant: str) -> str:
    """A new assistant of ``tenant``; its id."""
    assistant, _ = await db.assistants.create(
        tenant,
        assistant_id=None,
        graph_id="agent",
        name="a",
        description=None,
        config={},
        context={},
        metadata={},
        if_exists="raise",
    )
    return str(assistant["assistant_id"])
