"""Initial schema: keys, assistants, threads, checkpoints, runs, run events, store items.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

from nimbus.adapters.store.schema import metadata

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The first revision creates the tables exactly as nimbus.adapters.store.schema defines them at
    # this revision; later revisions alter them with explicit operations.
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
