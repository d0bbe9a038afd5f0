"""PostgreSQL: queue a run and, when it may start at once, claim it, in one round trip
(``nimbus_queue_run`` with a ninth argument: the worker claiming it).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# As nimbus_queue_run of 0002 (which stays, for processes of the version before), plus: with
# p_owner set (a worker of the calling process has a slot free for the run), a run whose
# thread has no other run in progress (running, waiting, or still held by a worker) is
# inserted already claimed by p_owner: running, its first attempt recorded, lease token 1,
# as a claim (pg.py's _CLAIM) would leave it. No row back: no such thread.
QUEUE_AND_CLAIM = """
CREATE OR REPLACE FUNCTION nimbus_queue_run(
    p_run_id text, p_tenant_id text, p_thread_id text, p_assistant_id text,
    p_metadata jsonb, p_kwargs jsonb, p_strategy text, p_stamp timestamptz, p_owner text
) RETURNS TABLE (
    interrupted text[], claimed boolean, thread_values jsonb, thread_checkpoint_id varchar
) LANGUAGE plpgsql AS $$
DECLARE
    v_active text[];
    v_held boolean;
BEGIN
    UPDATE threads SET status = 'busy', updated_at = p_stamp
    WHERE tenant_id = p_tenant_id AND thread_id = p_thread_id
    RETURNING threads."values", threads.checkpoint_id INTO thread_values, thread_checkpoint_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(r.run_id) FILTER (WHERE r.status IN ('pending', 'running')), '{}'),
           coalesce(bool_or(r.lease_owner IS NOT NULL), false)
    INTO v_active, v_held
    FROM runs r
    WHERE r.tenant_id = p_tenant_id AND r.thread_id = p_thread_id
        AND (r.status IN ('pending', 'running') OR r.lease_owner IS NOT NULL);
    interrupted := '{}';
    IF cardinality(v_active) > 0 THEN
        IF p_strategy = 'reject' THEN
            RAISE EXCEPTION 'thread % is busy', p_thread_id USING ERRCODE = 'NB409';
        ELSIF p_strategy IN ('interrupt', 'rollback') THEN
            UPDATE runs SET status = 'interrupted', updated_at = p_stamp
            WHERE run_id = ANY(v_active);
            interrupted := v_active;
        END IF;
    END IF;
    claimed := p_owner IS NOT NULL AND cardinality(v_active) = 0 AND NOT v_held;
    INSERT INTO runs (run_id, tenant_id, thread_id, assistant_id, status, metadata, kwargs,
                      multitask_strategy, state, error, attempts, created_at, updated_at,
                      lease_owner, lease_token)
    VALUES (p_run_id, p_tenant_id, p_thread_id, p_assistant_id,
            CASE WHEN claimed THEN 'running' ELSE 'pending' END, p_metadata, p_kwargs,
            p_strategy, NULL, NULL, CASE WHEN claimed THEN 1 ELSE 0 END, p_stamp, p_stamp,
            CASE WHEN claimed THEN p_owner END, CASE WHEN claimed THEN 1 ELSE 0 END);
    IF claimed THEN
        INSERT INTO run_attempts (run_id, attempt, tenant_id, worker, claimed_at)
        VALUES (p_run_id, 1, p_tenant_id, p_owner, p_stamp);
    END IF;
    RETURN NEXT;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(QUEUE_AND_CLAIM)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS nimbus_queue_run("
            "text, text, text, text, jsonb, jsonb, text, timestamptz, text)"
        )
