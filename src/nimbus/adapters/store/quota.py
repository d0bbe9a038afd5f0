"""The cap on a tenant's waiting runs (``NIMBUS_TENANT_MAX_QUEUED``), kept by the database.

A check before queueing raced: 100 concurrent requests all saw room and were all queued. The
cap is now a rule of the ``runs`` table, checked by the insert of every pending run, so that
every path that queues a run, on every replica, is held to it atomically:

- PostgreSQL: a trigger (migration 0008) reads the cap from the session's
  ``nimbus.tenant_max_queued`` setting (set by both connection pools; unset: no cap), takes a
  per-tenant transaction lock, so that one tenant's concurrent queueings take turns, and
  counts the tenant's pending runs. Each statement of a PL/pgSQL function takes a new
  snapshot, so the count sees the runs committed by whoever held the lock before.
- SQLite: one connection per process, one transaction at a time; a TEMP trigger of that
  connection, with the cap written in.

A refusal is :class:`~nimbus.exceptions.QueueFull` (429 over HTTP).
A run claimed as it is
queued (inserted ``running``) waits for nothing and is not counted.
"""

from __future__ import annotations

import sqlite3
from typing import Any

SETTING = "nimbus.tenant_max_queued"  #: the PostgreSQL session setting the trigger reads
QUEUE_FULL_STATE = "NB429"  #: the SQLSTATE the PostgreSQL trigger raises
_SQLITE_MESSAGE = "nimbus: tenant queue full"

PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION nimbus_queue_cap() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_cap bigint := nullif(current_setting('{SETTING}', true), '')::bigint;
    v_waiting bigint;
BEGIN
    IF v_cap IS NULL THEN
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('nimbus.queue:' || NEW.tenant_id, 0));
    SELECT count(*) INTO v_waiting FROM runs
    WHERE tenant_id = NEW.tenant_id AND status = 'pending';
    IF v_waiting >= v_cap THEN
        RAISE EXCEPTION 'tenant % has % runs waiting', NEW.tenant_id, v_waiting
            USING ERRCODE = '{QUEUE_FULL_STATE}';
    END IF;
    RETURN NEW;
END
$$
"""
PG_TRIGGER = """
CREATE TRIGGER runs_queue_cap BEFORE INSERT ON runs
FOR EACH ROW WHEN (NEW.status = 'pending') EXECUTE FUNCTION nimbus_queue_cap()
"""


def sqlite_trigger(cap: int) -> str:
    """The TEMP trigger that holds one SQLite connection's inserts to ``cap`` waiting runs
    per tenant (``ix_runs_pending`` serves the count)."""
    return f"""
CREATE TEMP TRIGGER IF NOT EXISTS nimbus_queue_cap BEFORE INSERT ON main.runs
WHEN NEW.status = 'pending' AND (
    SELECT count(*) FROM main.runs WHERE tenant_id = NEW.tenant_id AND status = 'pending'
) >= {int(cap)}
BEGIN SELECT RAISE(ABORT, '{_SQLITE_MESSAGE}'); END
"""


def install_sqlite(cursor: Any, cap: int) -> None:
    """Put the cap on the SQLite connection of ``cursor`` (a DB-API cursor); nothing before
    the ``runs`` table exists (the caller installs it again after the migrations)."""
    cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'")
    if cursor.fetchone() is not None:
        cursor.execute(sqlite_trigger(cap))


def queue_full(exc: BaseException) -> bool:
    """Whether ``exc`` (from any driver, raw or wrapped by SQLAlchemy) is the cap refusing a
    run."""
    seen: set[int] = set()
    current: Any = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "sqlstate", None) == QUEUE_FULL_STATE:
            return True
        if isinstance(current, sqlite3.IntegrityError) and _SQLITE_MESSAGE in str(current):
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False
