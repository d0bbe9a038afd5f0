"""Idempotency keys of run creation, per tenant.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import inspect

from nimbus.adapters.store.schema import idempotency_keys

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if not inspect(bind).has_table(idempotency_keys.name):  # 0001 made it on a new database
        idempotency_keys.create(bind)


def downgrade() -> None:
    op.drop_table(idempotency_keys.name)
