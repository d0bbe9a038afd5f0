"""Alembic environment: runs on the connection Nimbus hands over (see
nimbus.adapters.store.engine)."""

from __future__ import annotations

from alembic import context

from nimbus.adapters.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through nimbus.adapters.store.engine.migrate()")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
