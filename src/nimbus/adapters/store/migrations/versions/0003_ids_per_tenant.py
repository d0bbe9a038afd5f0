"""Thread and assistant ids are per tenant: primary keys (tenant_id, id).

Another tenant's thread or assistant id then behaves exactly like a free one (a tenant can
create its own thread with it) instead of answering 409.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import Table, inspect

from nimbus.adapters.store.schema import assistant_versions, assistants, threads

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _rekey(table: Table, columns: list[str]) -> None:
    """Give ``table`` the primary key ``columns`` (a database made by 0001 from this
    version of the schema already has it)."""
    bind = op.get_bind()
    current = inspect(bind).get_pk_constraint(table.name)
    if current["constrained_columns"] == columns:
        return
    if bind.dialect.name == "postgresql":
        op.drop_constraint(current["name"] or f"{table.name}_pkey", table.name, type_="primary")
        op.create_primary_key(f"{table.name}_pkey", table.name, columns)
        return
    # SQLite cannot change a primary key: rebuild the table (its index names are global,
    # so the old table's indexes go before the new table makes them again).
    old = f"{table.name}_before_0003"
    op.execute(f'ALTER TABLE "{table.name}" RENAME TO "{old}"')
    for index in inspect(bind).get_indexes(old):
        op.execute(f'DROP INDEX "{index["name"]}"')
    table.create(bind)
    names = ", ".join(f'"{c.name}"' for c in table.columns)
    op.execute(f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM "{old}"')
    op.execute(f'DROP TABLE "{old}"')


def upgrade() -> None:
    _rekey(threads, ["tenant_id", "thread_id"])
    _rekey(assistants, ["tenant_id", "assistant_id"])
    _rekey(assistant_versions, ["tenant_id", "assistant_id", "version"])


def downgrade() -> None:
    raise NotImplementedError("ids per tenant cannot be undone once tenants share an id")
