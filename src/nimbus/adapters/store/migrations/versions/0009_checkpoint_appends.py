"""Checkpoints stored as what they add: ``kind`` ("full" or "append") and ``seq`` (the place
in its chain), see nimbus.adapters.store.checkpoints. Existing rows are full snapshots without a
``seq``: nothing is rewritten (on both databases, a column with a constant default is added
without touching the rows).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import inspect

from nimbus.adapters.store.checkpoints import Stored, rebuild
from nimbus.adapters.store.schema import checkpoints

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = {c["name"] for c in inspect(op.get_bind()).get_columns("checkpoints")}
    if "kind" in existing:  # 0001 made it from the current schema on a new database
        return
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="full"))
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=True))


def downgrade() -> None:
    # The revision before reads every row as whole values: write the appends out whole.
    bind = op.get_bind()
    c = checkpoints
    of_threads = sa.select(c.c.tenant_id, c.c.thread_id).where(c.c.kind == "append").distinct()
    for tenant_id, thread_id in bind.execute(of_threads).all():
        rows = bind.execute(
            sa.select(c.c.checkpoint_id, c.c.parent_id, c.c.kind, c.c["values"]).where(
                c.c.tenant_id == tenant_id, c.c.thread_id == thread_id
            )
        ).all()
        stored: dict[str, Stored] = {r[0]: (r[1], r[2], r[3]) for r in rows}
        appends = [r[0] for r in rows if r[2] == "append"]
        for checkpoint_id, values in rebuild(stored, appends).items():
            if stored[checkpoint_id][1] == "append":
                bind.execute(
                    sa.update(c).where(c.c.checkpoint_id == checkpoint_id).values(values=values)
                )
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("seq")
        batch.drop_column("kind")
