"""A worker's liveness lock (PostgreSQL): how the other workers learn at once that it died.

Each worker process holds a session-level advisory lock keyed by its id, on a connection of
its own that stays open for the worker's life (not a pooled one: pooled connections are
shared and reset). When the process dies, the kernel closes its sockets, the server ends its
sessions and PostgreSQL releases the lock at once. The sweep of every other worker
(:func:`nimbus.adapters.store.postgres_runs.sweep_dead`, every ``SWEEP_INTERVAL_S`` on this
same connection)
then finds the lock free and hands the dead worker's runs back to the queue: about a second
from death to resumption, instead of the lease's TTL.

A stalled process (SIGSTOP, a long pause) keeps its connection and its lock: only its
heartbeat's expiry hands its runs over, as it always did, and the fencing token refuses its
later writes. A host that vanishes (power, partition) is also noticed through its lease: the
server keeps its sessions, and so its lock, until TCP gives up on them.

**The restart guard.** When PostgreSQL restarts, every connection ends and every lock is free
until its worker reconnects and takes it again. A sweeper trusts a free lock only once its own
lock has been held, on its current connection, for ``RESTART_GRACE_S``; until then it sweeps
by expired heartbeats alone. The sweep runs on that very connection, so a sweep that succeeds
proves that the connection, and therefore the database, has been up that long. Workers try to
take their lock again at least every ``RECONNECT_S[-1]`` while it is lost, well within the
grace. A worker claims no run while it does not hold its lock (:attr:`LivenessLock.held`):
a run claimed then would look dead to every sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import structlog

from nimbus.adapters.store.engine import unavailable
from nimbus.adapters.store.postgres_runs import PostgresRuns, sweep_dead, take_liveness_lock

log = structlog.get_logger("nimbus.liveness")
# Back-off between attempts to take the lock again; capped at 1 s, so that after a restart
# every live worker holds its lock again long before a sweeper trusts free locks.
RECONNECT_S = (0.1, 0.25, 0.5, 1.0)
RESTART_GRACE_S = 5.0  # a sweeper trusts a free lock once its own has been held this long
STATEMENT_TIMEOUT_S = 5.0  # a statement on the lock's connection that takes longer: link lost


class LivenessLock:
    """``worker``'s liveness lock, held on a connection of its own, taken again whenever that
    connection is lost; the sweep of dead workers runs on the same connection."""

    def __init__(self, pg_runs: PostgresRuns, worker: str) -> None:
        self.pg_runs, self.worker = pg_runs, worker
        self._conn: asyncpg.Connection | None = None
        self._since = 0.0  # when the lock was taken on the current connection (monotonic)
        self._lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def held(self) -> bool:
        """Whether this worker holds its lock now (as far as it knows)."""
        return self._conn is not None

    @property
    def trusted(self) -> bool:
        """Whether a free lock of another worker means it is dead: ours has been held for
        ``RESTART_GRACE_S`` on the current connection (see the restart guard above)."""
        return self.held and time.monotonic() - self._since >= RESTART_GRACE_S

    async def start(self) -> None:
        """Take the lock (before the worker's first claim), and keep it from now on."""
        await self._take_again()
        self._keeper = asyncio.create_task(self._keep(), name="nimbus-liveness-lock")

    async def close(self) -> None:
        """Give the lock up (the worker's last act: whatever it still holds is swept)."""
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # the server sees the end at once, and releases the lock

    async def sweep(self) -> list[tuple[str, str]] | None:
        """Hand the runs of dead workers back to the queue (see
        :func:`nimbus.adapters.store.postgres_runs.sweep_dead`); returns (run id, status now)
        of each, or None when the lock is not held now (it is being taken again). One caller
        at a time."""
        conn = self._conn
        if conn is None:
            return None
        trusted = self.trusted  # read before the statement: its success proves it
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT_S):
                return await sweep_dead(conn, self.worker, trusted)
        except Exception as exc:
            if isinstance(exc, TimeoutError) or unavailable(exc):
                self._on_lost(conn)  # the keeper takes it again on a new connection
            raise

    def _on_lost(self, conn: object) -> None:
        if conn is self._conn:  # not an older connection, ended since
            self._lost.set()

    async def _take(self) -> bool:
        """Connect and take the lock; False when another session holds it. Raises when the
        database cannot be reached."""
        async with asyncio.timeout(STATEMENT_TIMEOUT_S):
            conn = await self.pg_runs.connect()
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT_S):
                taken = await take_liveness_lock(conn, self.worker)
        except BaseException:
            conn.terminate()
            raise
        if not taken:
            conn.terminate()
            return False
        self._lost.clear()
        conn.add_termination_listener(self._on_lost)
        self._conn, self._since = conn, time.monotonic()
        return True

    async def _keep(self) -> None:
        """Whenever the lock's connection is lost, take the lock again on a new one."""
        while not self._closed:
            await self._lost.wait()
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.terminate()
            log.warning("worker.liveness_lock_lost", worker=self.worker)
            lost_at = time.monotonic()
            await self._take_again()
            log.info("worker.liveness_lock_taken", after_s=round(time.monotonic() - lost_at, 2))

    async def _take_again(self) -> None:
        """Until the lock is taken, with back-off; the first failure is logged."""
        failures = 0
        while True:
            error = "held by an earlier session of this worker"
            try:
                if await self._take():
                    return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                error = str(exc)
            except TimeoutError:
                error = "timed out"
            if failures == 0:
                log.warning("worker.liveness_lock_not_taken", error=error)
            await asyncio.sleep(RECONNECT_S[min(failures, len(RECONNECT_S) - 1)])
            failures += 1
