"""Alembic environment: runs on the connection Nimbus hands over (see nimbus.store.db)."""

from __future__ import annotations

from alembic import context

from nimbus.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through nimbus.store.db.migrate()")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
