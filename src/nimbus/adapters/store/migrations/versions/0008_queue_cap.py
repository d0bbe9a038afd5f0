"""PostgreSQL: the per-tenant cap on waiting runs, a trigger on the runs table (see
nimbus.adapters.store.quota). SQLite keeps it in a TEMP trigger of its one connection.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

from nimbus.adapters.store.quota import PG_FUNCTION, PG_TRIGGER

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS runs_queue_cap ON runs")
        op.execute("DROP FUNCTION IF EXISTS nimbus_queue_cap()")
