"""PostgreSQL's hot path: the statements every run makes, straight on asyncpg.

A run makes a dozen statements (queue it, claim it, read its thread, write each step). Through
SQLAlchemy each costs 150-300 µs of CPU in this process (building the statement, the pool's
checkout and reset, the result machinery); on a pool of plain asyncpg connections with
prepared statements it costs 30-50 µs. Everything else, and all of SQLite, goes through
SQLAlchemy; the tests run both paths against both databases.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, cast

import asyncpg
from sqlalchemy import Boolean, Connection, String, bindparam, column, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import DBAPIError

from nimbus.adapters.store.common import now, pending_run
from nimbus.exceptions import ThreadBusy
from nimbus.records import Assistant, ClaimedRun, Queued, Run, ThreadHead, new_id

if TYPE_CHECKING:
    from nimbus.adapters.store.liveness import LivenessLock

_THREAD = "SELECT * FROM threads WHERE tenant_id = $1 AND thread_id = $2"
_ASSISTANT = "SELECT * FROM assistants WHERE tenant_id = $1 AND assistant_id = $2"
_RUN = "SELECT * FROM runs WHERE tenant_id = $1 AND run_id = $2"
_RUN_STATE = "SELECT status, lease_owner FROM runs WHERE run_id = $1"
# Leases (see docs/architecture.md, "Workers and leases"). A run's lease is its worker's, alive
# while the worker's row in `workers` has not expired; expiry times are the database's clock,
# so workers on machines whose clocks disagree still agree on who holds what.
#
# A run may start when its thread has no other run in progress (one still held by a worker,
# even if it was interrupted, or running) and no older run waiting: runs of a thread go one
# at a time, in order. A run whose worker died goes back to the queue by the sweep.
_CLAIMABLE = """
p.status = 'pending'
AND NOT EXISTS (
    SELECT 1 FROM runs o
    WHERE o.tenant_id = p.tenant_id AND o.thread_id = p.thread_id AND o.run_id <> p.run_id
      AND (o.status = 'running' OR o.lease_owner IS NOT NULL
           OR (o.status = 'pending' AND o.created_at < p.created_at)))
"""
# The claimed runs come back with their thread's values, from the thread update itself (a
# join of the two afterwards was a nested loop over both: quadratic in the runs claimed).
_TAKE = """
r AS (
    UPDATE runs SET status = 'running', attempts = attempts + 1, updated_at = $2,
        lease_owner = $3, lease_token = lease_token + 1
    FROM picked WHERE runs.run_id = picked.run_id
    RETURNING runs.*
), t AS (
    UPDATE threads SET status = 'busy', updated_at = $2
    FROM r WHERE threads.thread_id = r.thread_id AND threads.tenant_id = r.tenant_id
    RETURNING r.*, true AS thread_found, threads."values" AS thread_values,
              threads.checkpoint_id AS thread_checkpoint_id
), a AS (
    INSERT INTO run_attempts (run_id, attempt, tenant_id, worker, claimed_at)
    SELECT run_id, attempts, tenant_id, lease_owner, $2 FROM r
)
SELECT * FROM t
UNION ALL
SELECT r.*, false, NULL::jsonb, NULL::varchar FROM r WHERE r.run_id NOT IN (SELECT run_id FROM t)
"""
_CLAIM = f"""
WITH picked AS (SELECT p.run_id FROM runs p WHERE p.run_id = $1 AND {_CLAIMABLE} FOR UPDATE),
{_TAKE}
"""
# The next runs for a worker with free slots: fair across tenants (each tenant's oldest
# first, then each one's second...), within each tenant's cap of running runs ($4), locked
# with SKIP LOCKED so that workers claiming at once take different runs.
# Tenants with waiting runs are found by skipping through the index of waiting runs (one
# probe per tenant), then each tenant's oldest runs are read: the cost of a claim grows with
# the number of tenants waiting and $1, not with the length of the queue.
_CANDIDATES = f"""
RECURSIVE waiting AS (
    (SELECT tenant_id FROM runs WHERE status = 'pending' ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT r.tenant_id FROM runs r
            WHERE r.status = 'pending' AND r.tenant_id > w.tenant_id
            ORDER BY r.tenant_id LIMIT 1)
    FROM waiting w WHERE w.tenant_id IS NOT NULL
), cand AS (
    SELECT c.run_id, c.tenant_id, c.created_at,
           row_number() OVER (PARTITION BY c.tenant_id ORDER BY c.created_at) AS rn
    FROM waiting w CROSS JOIN LATERAL (
        SELECT p.run_id, p.tenant_id, p.created_at FROM runs p
        WHERE p.status = 'pending' AND p.tenant_id = w.tenant_id
          AND NOT (p.run_id = ANY($5::text[])) AND {_CLAIMABLE}
        ORDER BY p.created_at LIMIT $1 * 4
    ) c
    WHERE w.tenant_id IS NOT NULL
)"""
# Candidates are four times as many as wanted, and the lock skips those another worker is
# taking: workers claiming at once each get their share, not the same few runs.
_PICK = f"""
picked AS (
    SELECT runs.run_id FROM runs JOIN capped ON capped.run_id = runs.run_id
    WHERE runs.status = 'pending'
    ORDER BY capped.rn, capped.created_at
    LIMIT $1
    FOR UPDATE OF runs SKIP LOCKED
),
{_TAKE}
"""
_CLAIM_NEXT = f"""
WITH {_CANDIDATES}, busy AS (
    SELECT tenant_id, count(*) AS n FROM runs WHERE status = 'running' GROUP BY tenant_id
), capped AS (
    SELECT cand.run_id, cand.rn, cand.created_at
    FROM cand LEFT JOIN busy ON busy.tenant_id = cand.tenant_id
    WHERE cand.rn + coalesce(busy.n, 0) <= $4
    ORDER BY cand.rn, cand.created_at
    LIMIT $1 * 4
), {_PICK}"""
# Without a cap there is no need to count every running run ($4 unused).
_CLAIM_NEXT_UNCAPPED = f"""
WITH {_CANDIDATES}, capped AS (
    SELECT cand.run_id, cand.rn, cand.created_at FROM cand
    WHERE $4::bigint > 0 ORDER BY cand.rn, cand.created_at LIMIT $1 * 4
), {_PICK}"""
UNCAPPED = 1 << 30  #: a tenant cap that means none
# A worker's heartbeat: its row lives on for $2 seconds more.
_HEARTBEAT = """
INSERT INTO workers (worker_id, started_at, expires_at)
VALUES ($1, now(), now() + make_interval(secs => $2))
ON CONFLICT (worker_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
_RETIRE = "UPDATE workers SET expires_at = now() WHERE worker_id = $1"
# The runs a worker thinks it holds, as they are (a read: no lock on any run).
_HELD = """
SELECT run_id, status, lease_owner, lease_token FROM runs WHERE run_id = ANY($1::text[])
"""
# Give leases up: those that expired (the sweeper), or a worker's own (a graceful stop). A run
# that was running goes back to the queue; one that was being interrupted ends interrupted,
# its thread too unless it has other runs. The token grows: the old holder cannot write.
_RELEASE = """
WITH x AS (
    UPDATE runs SET status = CASE WHEN status = 'running' THEN 'pending' ELSE status END,
        lease_owner = NULL, lease_token = lease_token + 1, updated_at = now()
    WHERE {which}
    RETURNING run_id, tenant_id, thread_id, status
), t AS (
    UPDATE threads SET status = 'interrupted', updated_at = now()
    FROM x WHERE x.status = 'interrupted'
        AND threads.tenant_id = x.tenant_id AND threads.thread_id = x.thread_id
        AND NOT EXISTS (
            SELECT 1 FROM runs o
            WHERE o.tenant_id = x.tenant_id AND o.thread_id = x.thread_id
              AND o.run_id <> x.run_id AND o.status IN ('pending', 'running'))
)
SELECT run_id, status FROM x
"""
# A worker's liveness lock (nimbus.adapters.store.liveness): a session-level advisory lock keyed by
# its id, which PostgreSQL releases the moment the worker's connection ends.
_LIVENESS_KEY = "hashtextextended('nimbus.worker:' || {worker}, 0)"
_TAKE_LIVENESS = f"SELECT pg_try_advisory_lock({_LIVENESS_KEY.format(worker='$1')})"
# The workers that hold runs and are dead: their heartbeat expired (dead or stalled), or, when
# the sweeper may trust a free lock ($2: see nimbus.adapters.store.liveness, the restart
# guard), their
# liveness lock can be taken (the process died). The lock is tried in the transaction only
# (released when the statement ends), never for the sweeper ($1) itself: its own session holds
# its lock, and would take it again. The owners are found by skipping through the partial
# index of held runs, one probe per owner: with nobody dead this costs a few index probes
# per worker holding runs, whatever the number of runs.
_DEAD_OWNERS = f"""
WITH RECURSIVE owner AS (
    (SELECT lease_owner AS id FROM runs WHERE lease_owner IS NOT NULL
     ORDER BY lease_owner LIMIT 1)
    UNION ALL
    SELECT (SELECT r.lease_owner FROM runs r
            WHERE r.lease_owner IS NOT NULL AND r.lease_owner > o.id
            ORDER BY r.lease_owner LIMIT 1)
    FROM owner o WHERE o.id IS NOT NULL
)
SELECT o.id FROM owner o
WHERE o.id IS NOT NULL AND (
    NOT EXISTS (SELECT 1 FROM workers w WHERE w.worker_id = o.id AND w.expires_at > now())
    OR ($2 AND o.id <> $1 AND pg_try_advisory_xact_lock({_LIVENESS_KEY.format(worker="o.id")})))
"""
_SWEEP_DEAD = _RELEASE.format(
    which=f"lease_owner IS NOT NULL AND lease_owner = ANY(ARRAY({_DEAD_OWNERS}))"
)
# The slow sweep, on the pool, trusts no lock ($2 false): expired heartbeats only, and the
# running runs a version without leases left (a scan of every running run: not for the
# frequent sweep).
_SWEEP = _RELEASE.format(
    which=f"(lease_owner IS NOT NULL AND lease_owner = ANY(ARRAY({_DEAD_OWNERS})))"
    " OR (status = 'running' AND lease_owner IS NULL)"
)
_FORGET_WORKERS = """
DELETE FROM workers w WHERE w.expires_at < now() - interval '1 day'
AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.lease_owner = w.worker_id)
"""
_HAND_BACK = _RELEASE.format(
    which="lease_owner = $1 AND (run_id, lease_token) IN"
    " (SELECT * FROM unnest($2::text[], $3::bigint[]))"
)
_PENDING = "SELECT count(*) FROM runs WHERE status = 'pending'"
_TENANT_PENDING = "SELECT count(*) FROM runs WHERE status = 'pending' AND tenant_id = $1"
_QUEUE = "SELECT * FROM nimbus_queue_run($1, $2, $3, $4, $5, $6, $7, $8, $9)"  # migration 0007
# An assistant of tenant {t} named by {n}: its id, else the first one made from the graph of
# that name, else the newest one with that name. The Append of a plan that is not parallel
# (these tables are far too small for a parallel plan, and a query calling a function that
# writes never has one) reads its branches in order, and LIMIT stops it at the first row: a
# branch is read only when those before it found nothing.
_NAMED = """
SELECT * FROM assistants WHERE tenant_id = {t} AND assistant_id = {n}
UNION ALL
(SELECT * FROM assistants WHERE tenant_id = {t} AND graph_id = {n} ORDER BY created_at LIMIT 1)
UNION ALL
(SELECT * FROM assistants WHERE tenant_id = {t} AND name = {n} ORDER BY created_at DESC LIMIT 1)
LIMIT 1
"""
_FIND_ASSISTANT = _NAMED.format(t="$1", n="$2")
# Queueing, reading the run's assistant (named by $4, as above) in the same round trip: no row
# when the tenant has no such assistant (the function is then not called: nothing is queued)
# or no such thread.
_QUEUE_KNOWN = f"""
SELECT a.*, q.interrupted, q.claimed, q.thread_values, q.thread_checkpoint_id
FROM ({_NAMED.format(t="$2", n="$4")}) a
CROSS JOIN LATERAL nimbus_queue_run($1, a.tenant_id, $3, a.assistant_id, $5, $6, $7, $8, $9) q
"""
_QUEUED = ("interrupted", "claimed", "thread_values", "thread_checkpoint_id")
# A run on a new, temporary thread (stateless runs): both rows in one statement.
_QUEUE_STATELESS = """
WITH t AS (
    INSERT INTO threads (thread_id, tenant_id, status, metadata, "values", checkpoint_id,
                         created_at, updated_at)
    VALUES ($8, $2, 'busy', $9, '{}'::jsonb, NULL, $7, $7)
)
INSERT INTO runs (run_id, tenant_id, thread_id, assistant_id, status, metadata, kwargs,
                  multitask_strategy, state, error, attempts, created_at, updated_at)
VALUES ($1, $2, $8, $3, 'pending', $4, $5, $6, NULL, NULL, 0, $7, $7)
"""
BUSY_STATE = "NB409"  # the SQLSTATE nimbus_queue_run raises for a busy thread (reject)


async def _setup(conn: asyncpg.Connection) -> None:
    """JSON columns in and out as Python values, through orjson. Binary format: arrays of
    jsonb (the step writes) are then sent element by element, never as array literals."""
    from nimbus.records import dump_json, load_json

    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: b"\x01" + dump_json(value).encode(),
        decoder=lambda data: load_json(data[1:]),
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "json",
        encoder=lambda value: dump_json(value).encode(),
        decoder=load_json,
        schema="pg_catalog",
        format="binary",
    )


def _claimed(found: asyncpg.Record) -> ClaimedRun:
    run = dict(found)
    thread_found = run.pop("thread_found")
    thread: ThreadHead = {
        "thread_id": run["thread_id"],
        "values": run.pop("thread_values"),
        "checkpoint_id": run.pop("thread_checkpoint_id"),
    }
    return cast(Run, run), thread if thread_found else None


# The statements here are key lookups and batch writes, one good plan each: plan them once
# per connection, not at every execution. No JIT compilation: these statements run in
# milliseconds, and compiling one (when a queue or a batch makes its estimated cost large)
# took 150 ms of CPU.
_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan", "jit": "off"}


async def take_liveness_lock(conn: asyncpg.Connection, worker: str) -> bool:
    """Take ``worker``'s liveness lock for the life of ``conn``'s session; False when another
    session holds it (an earlier connection of the same worker that the server has not yet
    seen end)."""
    return bool(await conn.fetchval(_TAKE_LIVENESS, worker))


async def sweep_dead(
    conn: asyncpg.Connection, sweeper: str, trust_locks: bool
) -> list[tuple[str, str]]:
    """Release the leases of dead workers: those whose heartbeat expired and, if
    ``trust_locks``, those whose liveness lock is free (never ``sweeper``'s own, which
    ``conn`` holds). Their running runs go back to the queue. Returns (run id, status now)
    of each."""
    rows = await conn.fetch(_SWEEP_DEAD, sweeper, trust_locks)
    return [(r["run_id"], r["status"]) for r in rows]


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: the statements here change
    no session state (an open transaction is still rolled back by asyncpg itself). asyncpg's
    default reset runs ``RESET ALL; UNLISTEN *; …``: a round trip per statement, measured at
    a sixth of a worker's CPU."""


def _queued(run: Run, found: Mapping[Any, Any], owner: str | None) -> Queued:
    """What ``nimbus_queue_run`` returned (``found``) for ``run``, as it was queued."""
    queued = Queued(run, interrupted=list(found["interrupted"] or ()))
    if found["claimed"]:
        run["status"], run["attempts"] = "running", 1
        run["lease_owner"], run["lease_token"] = owner, 1
        queued.claimed = True
        queued.thread = {
            "thread_id": run["thread_id"],
            "values": found["thread_values"],
            "checkpoint_id": found["thread_checkpoint_id"],
        }
    return queued


# nimbus_queue_run through SQLAlchemy, for the general path (in a transaction of its own).
_QUEUE_IN = (
    text(
        "SELECT * FROM nimbus_queue_run(:run_id, :tenant_id, :thread_id, :assistant_id, "
        ":metadata, :kwargs, :strategy, :stamp, :owner)"
    )
    .bindparams(bindparam("metadata", type_=JSONB), bindparam("kwargs", type_=JSONB))
    .columns(
        column("interrupted", ARRAY(String)),
        column("claimed", Boolean),
        column("thread_values", JSONB),
        column("thread_checkpoint_id", String),
    )
)


def queue_in(
    conn: Connection,
    run_id: str,
    tenant_id: str,
    thread_id: str,
    assistant_id: str,
    kwargs: dict[str, Any],
    metadata: dict[str, Any],
    multitask_strategy: str,
    owner: str | None,
) -> Queued | None:
    """``nimbus_queue_run`` (PostgreSQL's one form of the rule of queueing) inside a
    transaction SQLAlchemy holds: the general path of
    :meth:`~nimbus.adapters.store.runs.RunStore.create` (synchronous, for ``run_sync``)."""
    stamp = now()
    params = {
        "run_id": run_id,
        "tenant_id": tenant_id,
        "thread_id": thread_id,
        "assistant_id": assistant_id,
        "metadata": metadata,
        "kwargs": kwargs,
        "strategy": multitask_strategy,
        "stamp": stamp,
        "owner": owner,
    }
    try:
        found = conn.execute(_QUEUE_IN, params).mappings().first()
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == BUSY_STATE:
            raise ThreadBusy(thread_id) from None
        raise
    if found is None:
        return None
    run = pending_run(
        run_id, tenant_id, thread_id, assistant_id, kwargs, metadata, multitask_strategy, stamp
    )
    return _queued(run, found, owner)


class PostgresRuns:
    """The per-run statements on a pool of asyncpg connections."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool, self.url = pool, url

    @classmethod
    async def open(cls, dsn: str, size: int, session: dict[str, str] | None = None) -> PostgresRuns:
        """A pool of up to ``size`` connections to ``dsn`` (libpq's form: see
        :attr:`~nimbus.adapters.store.url.DatabaseURL.dsn`), each with the ``session``
        settings."""
        pool = await asyncpg.create_pool(
            dsn,
            min_size=0,  # no background reconnecting (and logging) while the server is down
            max_size=size,
            init=_setup,
            reset=_keep_session,
            max_inactive_connection_lifetime=300,
            server_settings={**_SERVER_SETTINGS, **(session or {})},
        )
        return cls(pool, dsn)

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool, for a session that must outlive any
        one statement (a worker's liveness lock, :mod:`nimbus.adapters.store.liveness`)."""
        return await asyncpg.connect(self.url, server_settings=_SERVER_SETTINGS)

    async def close(self) -> None:
        """Close every connection."""
        await self.pool.close()

    async def thread(self, tenant_id: str, thread_id: str) -> dict[str, Any] | None:
        """One thread of the tenant, or None."""
        found = await self.pool.fetchrow(_THREAD, tenant_id, thread_id)
        return None if found is None else dict(found)

    async def assistant(self, tenant_id: str, assistant_id: str) -> dict[str, Any] | None:
        """One assistant of the tenant by id, or None."""
        found = await self.pool.fetchrow(_ASSISTANT, tenant_id, assistant_id)
        return None if found is None else dict(found)

    async def find_assistant(self, tenant_id: str, id_or_name: str) -> dict[str, Any] | None:
        """One assistant of the tenant by id, graph or name (see ``_NAMED``), or None."""
        found = await self.pool.fetchrow(_FIND_ASSISTANT, tenant_id, id_or_name)
        return None if found is None else dict(found)

    async def run(self, tenant_id: str, run_id: str) -> dict[str, Any] | None:
        """One run of the tenant, or None."""
        found = await self.pool.fetchrow(_RUN, tenant_id, run_id)
        return None if found is None else dict(found)

    async def run_state(self, run_id: str) -> tuple[str, str | None] | None:
        """A run's status and lease owner, or None if there is no such run."""
        found = await self.pool.fetchrow(_RUN_STATE, run_id)
        return None if found is None else (found["status"], found["lease_owner"])

    async def claim(self, run_id: str, owner: str) -> ClaimedRun | None:
        """Claim one run for ``owner`` (see :meth:`nimbus.adapters.store.runs.RunStore.claim`); None
        when it is not claimable now: taken, ended, or its thread busy with another run."""
        found = await self.pool.fetchrow(_CLAIM, run_id, now(), owner)
        return None if found is None else _claimed(found)

    async def claim_next(
        self,
        owner: str,
        limit: int,
        tenant_cap: int | None,
        skip: Collection[str] = (),
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` waiting runs for ``owner``, fairly across tenants, at most
        ``tenant_cap`` running per tenant (None: no cap), none of ``skip``."""
        if tenant_cap is None or tenant_cap >= UNCAPPED:
            query, tenant_cap = _CLAIM_NEXT_UNCAPPED, UNCAPPED
        else:
            query = _CLAIM_NEXT
        rows = await self.pool.fetch(query, limit, now(), owner, tenant_cap, list(skip))
        return [_claimed(r) for r in rows]

    async def heartbeat(self, owner: str, lease_s: float) -> None:
        """``owner`` is alive for ``lease_s`` seconds more: so are its leases."""
        await self.pool.execute(_HEARTBEAT, owner, lease_s)

    async def retire(self, owner: str) -> None:
        """``owner`` stops: whatever it still holds is swept at once."""
        await self.pool.execute(_RETIRE, owner)

    async def held(self, owner: str, held: dict[str, int]) -> dict[str, str]:
        """What became of the runs ``owner`` holds (run id → fencing token): the status of
        each one still its own, ``ended`` for those whose end it wrote meanwhile; the runs
        left out were lost (swept back into the queue, or taken by another worker)."""
        out = {}
        for r in await self.pool.fetch(_HELD, list(held)):
            if r["lease_token"] != held[r["run_id"]]:
                continue  # lost
            out[r["run_id"]] = r["status"] if r["lease_owner"] == owner else "ended"
        return out

    async def sweep(self) -> list[tuple[str, str]]:
        """Release the leases of workers that stopped renewing (their heartbeat expired):
        their running runs go back to the queue. Returns (run id, status now) of each. The
        frequent sweep, which also finds dead workers by their lock, is :func:`sweep_dead`."""
        swept = [(r["run_id"], r["status"]) for r in await self.pool.fetch(_SWEEP, "", False)]
        await self.pool.execute(_FORGET_WORKERS)
        return swept

    async def hand_back(self, owner: str, leases: dict[str, int]) -> list[str]:
        """Release ``owner``'s leases (run id → fencing token) of runs it no longer executes
        (it is stopping, or could not store their steps): they go back to the queue."""
        rows = await self.pool.fetch(_HAND_BACK, owner, list(leases), list(leases.values()))
        return [r["run_id"] for r in rows]

    def liveness(self, owner: str) -> LivenessLock:
        """``owner``'s liveness lock, on a connection of its own (not taken yet)."""
        from nimbus.adapters.store.liveness import LivenessLock  # which imports this module

        return LivenessLock(self, owner)

    async def pending(self, tenant_id: str | None = None) -> int:
        """How many runs wait in the queue (of one tenant, if given)."""
        if tenant_id is None:
            return int(await self.pool.fetchval(_PENDING))
        return int(await self.pool.fetchval(_TENANT_PENDING, tenant_id))

    async def queue_stateless_run(
        self,
        tenant_id: str,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        thread_metadata: dict[str, Any],
    ) -> Queued:
        """Queue a run on a new thread (see :meth:`RunStore.create` without a thread)."""
        stamp, run_id, thread_id = now(), new_id(), new_id()
        await self.pool.execute(
            _QUEUE_STATELESS,
            run_id,
            tenant_id,
            assistant_id,
            metadata,
            kwargs,
            multitask_strategy,
            stamp,
            thread_id,
            thread_metadata,
        )
        return Queued(
            pending_run(
                run_id,
                tenant_id,
                thread_id,
                assistant_id,
                kwargs,
                metadata,
                multitask_strategy,
                stamp,
            )
        )

    async def queue_run(
        self,
        tenant_id: str,
        thread_id: str,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        owner: str | None = None,
        *,
        with_assistant: bool = False,
    ) -> Queued | None:
        """Queue a run on an existing thread (see :meth:`RunStore.create`); None when the
        tenant has no such thread. With ``owner``, a run that may start at once is claimed
        by that worker as it is queued: it comes back running, with its lease token, and
        ``claimed`` with its thread. ``with_assistant``: ``assistant_id`` names the
        assistant by id, graph or name (see ``_QUEUE_KNOWN``); it is read in the same round
        trip and comes back as ``assistant``; None (nothing queued) when the tenant has no
        such assistant."""
        stamp, run_id = now(), new_id()
        try:
            found = await self.pool.fetchrow(
                _QUEUE_KNOWN if with_assistant else _QUEUE,
                run_id,
                tenant_id,
                thread_id,
                assistant_id,
                metadata,
                kwargs,
                multitask_strategy,
                stamp,
                owner,
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == BUSY_STATE:
                raise ThreadBusy(thread_id) from None
            raise
        if found is None:
            return None
        if with_assistant:
            assistant_id = found["assistant_id"]  # the id of the assistant it names
        run = pending_run(
            run_id, tenant_id, thread_id, assistant_id, kwargs, metadata, multitask_strategy, stamp
        )
        queued = _queued(run, found, owner)
        if with_assistant:
            queued.assistant = cast(Assistant, {k: v for k, v in found.items() if k not in _QUEUED})
        return queued
