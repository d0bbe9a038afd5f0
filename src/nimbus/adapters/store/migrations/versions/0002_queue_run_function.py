"""PostgreSQL: queue a run in one round trip (``nimbus_queue_run``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Each statement of a PL/pgSQL function sees what committed before it (READ COMMITTED takes a
# snapshot per statement): after the thread's row is locked, the check of its active runs
# sees a run that a concurrent request queued on the same thread, as a transaction of three
# statements from the client would.
QUEUE_RUN = """
CREATE OR REPLACE FUNCTION nimbus_queue_run(
    p_run_id text, p_tenant_id text, p_thread_id text, p_assistant_id text,
    p_metadata jsonb, p_kwargs jsonb, p_strategy text, p_stamp timestamptz
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    active text[];
BEGIN
    UPDATE threads SET status = 'busy', updated_at = p_stamp
    WHERE tenant_id = p_tenant_id AND thread_id = p_thread_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(array_agg(run_id), '{}') INTO active
    FROM runs
    WHERE tenant_id = p_tenant_id AND thread_id = p_thread_id
        AND status IN ('pending', 'running');
    IF cardinality(active) > 0 THEN
        IF p_strategy = 'reject' THEN
            RAISE EXCEPTION 'thread % is busy', p_thread_id USING ERRCODE = 'NB409';
        ELSIF p_strategy IN ('interrupt', 'rollback') THEN
            UPDATE runs SET status = 'interrupted', updated_at = p_stamp
            WHERE run_id = ANY(active);
        ELSE
            active := '{}';
        END IF;
    END IF;
    INSERT INTO runs (run_id, tenant_id, thread_id, assistant_id, status, metadata, kwargs,
                      multitask_strategy, state, error, attempts, created_at, updated_at)
    VALUES (p_run_id, p_tenant_id, p_thread_id, p_assistant_id, 'pending', p_metadata,
            p_kwargs, p_strategy, NULL, NULL, 0, p_stamp, p_stamp);
    RETURN active;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(QUEUE_RUN)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS nimbus_queue_run")
