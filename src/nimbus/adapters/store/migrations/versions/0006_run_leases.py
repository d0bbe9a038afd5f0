"""Run leases: the worker holding a run and its fencing token, the workers alive, and the
record of each run's attempts.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import inspect

from nimbus.adapters.store.schema import run_attempts, workers

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    for table in (run_attempts, workers):
        if not inspect(bind).has_table(table.name):  # 0001 made it on a new database
            table.create(bind)
    existing = {c["name"] for c in inspect(bind).get_columns("runs")}
    if "lease_owner" in existing:  # 0001 made it from the current schema on a new database
        return
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(64), nullable=True))
        batch.add_column(
            sa.Column("lease_token", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_index(
        "ix_runs_pending",
        "runs",
        ["tenant_id", "created_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_runs_lease_owner",
        "runs",
        ["lease_owner"],
        postgresql_where=sa.text("lease_owner IS NOT NULL"),
        sqlite_where=sa.text("lease_owner IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table(run_attempts.name)
    op.drop_table(workers.name)
    op.drop_index("ix_runs_lease_owner", "runs")
    op.drop_index("ix_runs_pending", "runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("lease_token")
        batch.drop_column("lease_owner")
