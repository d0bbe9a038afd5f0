"""PostgreSQL: run states, run events and checkpoint values as ``json``, not ``jsonb``.

They are written at every step and read whole, never searched; ``json`` stores the text as
is, which costs PostgreSQL far less than parsing it into ``jsonb``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = [
    ("checkpoints", "values"),
    ("checkpoints", "next"),
    ("runs", "kwargs"),
    ("runs", "state"),
    ("run_events", "data"),
]


def _retype(kind: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite keeps JSON as text anyway
    for table, column in COLUMNS:
        op.execute(
            f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE {kind} USING "{column}"::{kind}'
        )


def upgrade() -> None:
    _retype("json")


def downgrade() -> None:
    _retype("jsonb")
