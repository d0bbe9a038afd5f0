"""The in-process worker pool: takes queued runs, executes them, and on start-up resumes the
runs a previous process left queued or running (nothing is silently dropped).

Scheduling is fair across tenants: each tenant has its own queue, and free slots go to the
tenants in turn (round robin), so one tenant's backlog never holds back another's runs. A
tenant may also be capped in runs executing at once (``tenant_max_running``); its other runs
wait in its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import structlog

from nimbus.server.agents import AgentFactory
from nimbus.server.broker import RunBroker
from nimbus.server.executor import RunExecution
from nimbus.server.metrics import METRICS
from nimbus.store.database import Database

log = structlog.get_logger("nimbus.worker")


class Completion:
    """Set when a run ends in this process, with how it ended (for wait and join)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.outcome: tuple[str, str | None, dict[str, Any]] | None = None

    async def wait(self) -> None:
        """Until the run ends."""
        await self.event.wait()


class WorkerPool:
    """Up to ``concurrency`` runs at once (``tenant_max_running`` per tenant), fed by
    :meth:`submit`."""

    def __init__(
        self,
        db: Database,
        broker: RunBroker,
        agents: AgentFactory,
        concurrency: int = 256,
        tenant_max_running: int | None = None,
    ) -> None:
        self.db, self.broker, self.agents = db, broker, agents
        self.concurrency = concurrency
        self.tenant_max_running = tenant_max_running or concurrency
        self._queues: dict[str, deque[str]] = {}  # per tenant, in submission order
        self._turn: deque[str] = deque()  # tenants with queued runs, next one first
        self._running: dict[str, int] = {}  # per tenant
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, Completion] = {}
        self._given: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._thread_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._accepting = False

    async def start(self) -> None:
        """Start taking runs, first those an earlier process left unfinished."""
        self._accepting = True
        for run in await self.db.runs.unfinished():
            log.info("run.recovered", run_id=run["run_id"], status=run["status"])
            self.submit(run)

    def submit(self, run: dict[str, Any], assistant: dict[str, Any] | None = None) -> None:
        """Queue a run (already stored as pending). ``run`` is its row; ``assistant``, read
        by the request that made it, spares the worker reading it again."""
        run_id, tenant = run["run_id"], run["tenant_id"]
        self.broker.open(run_id)
        self._done.setdefault(run_id, Completion())
        if assistant is not None:
            self._given[run_id] = (run, assistant)
        queue = self._queues.setdefault(tenant, deque())
        if not queue:
            self._turn.append(tenant)
        queue.append(run_id)
        self._dispatch()

    def queued(self, tenant_id: str) -> int:
        """How many runs of the tenant wait for a slot here."""
        return len(self._queues.get(tenant_id, ()))

    def _dispatch(self) -> None:
        """Start queued runs while there are free slots, one tenant after another."""
        while self._accepting and len(self._tasks) < self.concurrency:
            for _ in range(len(self._turn)):
                tenant = self._turn[0]
                self._turn.rotate(-1)
                if self._running.get(tenant, 0) < self.tenant_max_running:
                    break
            else:
                break  # nobody queued, or every tenant with queued runs is at its cap
            queue = self._queues[tenant]
            run_id = queue.popleft()
            if not queue:
                del self._queues[tenant]
                self._turn.remove(tenant)
            self._running[tenant] = self._running.get(tenant, 0) + 1
            self._tasks[run_id] = asyncio.create_task(self._run(run_id, tenant))
        METRICS.queue_depth.set(sum(len(q) for q in self._queues.values()))

    async def _run(self, run_id: str, tenant: str) -> None:
        try:
            await self._execute(run_id)
        finally:
            self._tasks.pop(run_id, None)
            self._running[tenant] -= 1
            if not self._running[tenant]:
                del self._running[tenant]
            self._dispatch()

    def done_event(self, run_id: str) -> Completion | None:
        """Set when ``run_id`` finishes in this process (None if it is not here)."""
        return self._done.get(run_id)

    def cancel(self, run_id: str) -> bool:
        """Stop a run executing here; True if it was."""
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def _execute(self, run_id: str) -> None:
        METRICS.running.inc()
        outcome = None
        try:
            given = self._given.pop(run_id, None)
            run = given[0] if given else await self.db.runs.get_any(run_id)
            if run is None:
                return
            # Runs of one thread go one at a time, in the order they were queued (enqueue).
            key = (run["tenant_id"], run["thread_id"])  # thread ids are per tenant
            lock = self._thread_locks.setdefault(key, asyncio.Lock())
            try:
                async with lock:
                    outcome = await self._attempt(run_id, given[1] if given else None)
            finally:
                if not lock.locked() and not getattr(lock, "_waiters", None):
                    self._thread_locks.pop(key, None)
        except asyncio.CancelledError:
            await self._interrupted(run_id)
        except Exception:
            log.exception("run.crashed", run_id=run_id)
            await self._crashed(run_id)
        finally:
            METRICS.running.dec()
            self.broker.close(run_id)
            done = self._done.pop(run_id, None)
            if done is not None:
                done.outcome = outcome
                done.event.set()

    async def _attempt(
        self, run_id: str, assistant: dict[str, Any] | None
    ) -> tuple[str, str | None, dict[str, Any]] | None:
        claimed = await self.db.runs.claim(run_id)
        if claimed is None:
            return None  # cancelled or finished meanwhile
        run, thread = claimed
        if assistant is None:
            assistant = await self.db.assistants.get(run["tenant_id"], run["assistant_id"])
        if assistant is None or thread is None:
            await self._fail(run, "the run's assistant or thread was deleted")
            return None
        # Only an earlier attempt can have stored events.
        last_seq = await self.db.runs.last_seq(run_id) if run["attempts"] > 1 else -1
        execution = RunExecution(
            self.db, self.broker, self.agents, run, assistant, thread, last_seq
        )
        structlog.contextvars.bind_contextvars(run_id=run_id, tenant=run["tenant_id"])
        try:
            status = await execution.execute()
        finally:
            structlog.contextvars.unbind_contextvars("run_id", "tenant")
        log.info("run.finished", run_id=run_id, status=status)
        return execution.outcome

    async def _fail(self, run: dict[str, Any], message: str) -> None:
        from nimbus.store.runs import RunStore
        from nimbus.store.threads import ThreadStore

        async with self.db.engine.begin() as conn:
            await RunStore.update_in(conn, run["run_id"], status="error", error=message)
            await ThreadStore.set_status(conn, run["tenant_id"], run["thread_id"], "error")

    async def _interrupted(self, run_id: str) -> None:
        from nimbus.store.runs import RunStore
        from nimbus.store.threads import ThreadStore

        if not self._accepting:
            return  # shutting down: leave it running/pending so the next start resumes it
        run = await self.db.runs.get_any(run_id)
        if run is None:
            return
        async with self.db.engine.begin() as conn:
            await RunStore.update_in(conn, run_id, status="interrupted")
            tenant, thread = run["tenant_id"], run["thread_id"]
            if not await RunStore.has_other_active(conn, tenant, thread, run_id):
                await ThreadStore.set_status(conn, tenant, thread, "interrupted")

    async def _crashed(self, run_id: str) -> None:
        run = await self.db.runs.get_any(run_id)
        if run is not None:
            await self._fail(run, "internal error while running (see server logs)")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking runs; let running ones finish within ``grace_s``, then cancel them
        (they stay queued in the database and resume at the next start)."""
        self._accepting = False  # queued runs stay pending in the database
        running = [t for t in self._tasks.values() if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
