"""What every scheduler of runs does: execute a run, end it whatever happens, let waiters know.

A process executes runs through one of two schedulers, both :class:`Workers`:

- :class:`~nimbus.service.scheduler.LocalScheduler`: the process is the only one (SQLite);
  runs wait in memory, fairly across tenants.
- :class:`~nimbus.service.queue_worker.QueueWorker`: any number of processes share the run
  queue of the database (PostgreSQL); claims are leases.

:func:`worker_pool` picks the one the store calls for (:attr:`nimbus.ports.Store.queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from typing import Any

import structlog

from nimbus.exceptions import LeaseLost
from nimbus.ports import Bus, Store
from nimbus.records import Assistant, ClaimedRun, Outcome, Queued, Run, StepWrite
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.executor import RunExecution
from nimbus.service.metrics import METRICS

log = structlog.get_logger("nimbus.worker")
ATTEMPT_STRIDE = 1 << 20  # event numbers of attempt n start above (n - 1) * this


class Completion:
    """Set when a run ends in this process, with how it ended (for wait and join)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.outcome: Outcome | None = None

    async def wait(self) -> None:
        """Until the run ends."""
        await self.event.wait()


class Workers:
    """Up to ``concurrency`` runs at once (``tenant_max_running`` per tenant), fed by
    :meth:`submit`. The two schedulers decide when a run starts; this class runs it."""

    def __init__(
        self,
        db: Store,
        broker: RunBroker,
        agents: AgentFactory,
        concurrency: int = 256,
        tenant_max_running: int | None = None,
        *,
        bus: Bus | None = None,
    ) -> None:
        self.db, self.broker, self.agents = db, broker, agents
        self.concurrency = concurrency
        self.tenant_max_running = tenant_max_running or concurrency
        self.bus = bus
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._gone: dict[str, float] = {}  # runs whose task here ended without their end
        self._lost: set[str] = set()  # runs whose lease we lost: stop, write nothing
        self._executions: dict[str, RunExecution] = {}
        self._running: dict[str, int] = {}  # per tenant
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, Completion] = {}
        self._given: dict[str, tuple[Run, Assistant]] = {}
        self._thread_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._reserved = 0  # slots held for runs being queued (reserve)
        self._accepting = False

    # --- what a scheduler decides ----------------------------------------------------------
    async def start(self) -> None:
        """Start taking runs."""
        self._accepting = True

    def submit(
        self, queued: Queued, assistant: Assistant | None = None, *, reserved: bool = False
    ) -> None:
        """Take a run (already stored as pending, or ``claimed`` as it was queued);
        ``assistant``, read by the request that made it, spares the worker reading it again;
        ``reserved``: a slot was held for it (:meth:`reserve`)."""
        raise NotImplementedError

    def _freed(self) -> None:
        """A slot is free again: start what waits for one."""

    def _announce_queued(self) -> None:
        """Runs may be waiting that another process (or this one) could start now."""

    def _claimed(self, run: Run) -> None:
        """``run`` was claimed here (by :meth:`_attempt`)."""

    def _released(self, run_id: str, ended: bool, lost: bool) -> None:
        """Its task here is over (``ended``: its end was written; ``lost``: its lease was)."""

    def _owns(self, run_id: str) -> bool:
        """Whether the run is ours to end (claimed by us)."""
        return True

    def _lease_token(self, run_id: str) -> int:
        """The fencing token of our lease on the run (0: no leases)."""
        return 0

    def _alive(self) -> bool:
        """Whether runs may be claimed here now."""
        return True

    def _suspends(self, exc: BaseException) -> bool:
        """Whether a run that raised ``exc`` is left where it is for a later claim to resume
        (not ended)."""
        return False

    # --- slots -----------------------------------------------------------------------------
    def reserve(self, tenant_id: str) -> bool:
        """Hold a slot for a run of ``tenant_id`` about to be queued, so that it is claimed
        (by :attr:`owner`) as it is queued and starts at once; False when it would have to
        wait (no free slot, the tenant at its cap, runs queued here before it) or when this
        process runs none (API only). The slot is given back by :meth:`submit`
        (``reserved=True``) or :meth:`release`."""
        if not self._slot_free(tenant_id):
            return False
        self._reserved += 1
        self._running[tenant_id] = self._running.get(tenant_id, 0) + 1
        return True

    def _slot_free(self, tenant_id: str) -> bool:
        """Whether a run of ``tenant_id`` may start here now (slots held by :meth:`reserve`
        count as taken)."""
        return (
            self._accepting
            and self._alive()
            and len(self._tasks) + self._reserved < self.concurrency
            and self._running.get(tenant_id, 0) < self.tenant_max_running
        )

    def release(self, tenant_id: str) -> None:
        """Give back a slot of :meth:`reserve`."""
        self._reserved -= 1
        self._running[tenant_id] -= 1
        if not self._running[tenant_id]:
            del self._running[tenant_id]

    def _start_task(
        self,
        run_id: str,
        tenant: str,
        claimed: ClaimedRun | None,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        self._running[tenant] = self._running.get(tenant, 0) + 1
        self._tasks[run_id] = asyncio.create_task(self._run(run_id, tenant, claimed, after))

    def _open(
        self,
        run_id: str,
        run: Run | None = None,
        assistant: Assistant | None = None,
    ) -> None:
        """A run is about to execute here: keep its live events, and its end for waiters;
        its row and ``assistant``, when the request that made it read them, are kept for the
        worker (not read again)."""
        self.broker.open(run_id)
        self._done.setdefault(run_id, Completion())
        if run is not None and assistant is not None:
            self._given[run_id] = (run, assistant)

    async def _run(
        self,
        run_id: str,
        tenant: str,
        claimed: ClaimedRun | None = None,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        try:
            if after is not None:
                await asyncio.wait([after])
                self._open(run_id)
            await self._execute(run_id, claimed)
        finally:
            if self._tasks.get(run_id) is asyncio.current_task():
                del self._tasks[run_id]
            self._running[tenant] -= 1
            if not self._running[tenant]:
                del self._running[tenant]
            self._freed()

    # --- what waiters ask ------------------------------------------------------------------
    def _note_gone(self, run_id: str) -> None:
        now = time.monotonic()
        if len(self._gone) > 10_000:
            self._gone = {k: t for k, t in self._gone.items() if now - t < 60}
        self._gone[run_id] = now

    def gone(self, run_id: str) -> bool:
        """Whether ``run_id``'s task here ended without running it to its end: it was not
        claimable here, it failed, or its lease was lost (it may go on elsewhere)."""
        return run_id in self._gone

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

    def cancel_everywhere(self, run_id: str) -> None:
        """Stop a run (already marked interrupted in the database) wherever it executes."""
        if not self.cancel(run_id) and self.bus is not None:
            self.bus.publish("cancel", {"run": run_id})

    # --- executing a run -------------------------------------------------------------------
    async def _execute(self, run_id: str, claimed: ClaimedRun | None) -> None:
        METRICS.running.inc()
        outcome = None
        ended = False
        try:
            given = self._given.pop(run_id, None)
            if claimed is not None:
                run: Run | None = claimed[0]
            else:
                run = given[0] if given else await self.db.runs.get_any(run_id)
            if run is None:
                return
            # Runs of one thread go one at a time, in the order they were queued (enqueue).
            key = (run["tenant_id"], run["thread_id"])  # thread ids are per tenant
            lock = self._thread_locks.setdefault(key, asyncio.Lock())
            try:
                async with lock:
                    outcome = await self._attempt(run_id, given[1] if given else None, claimed)
                    ended = outcome is not None
            finally:
                if not lock.locked() and not getattr(lock, "_waiters", None):
                    self._thread_locks.pop(key, None)
        except LeaseLost:
            log.warning("run.lease_lost", run_id=run_id)  # another worker resumes it
        except asyncio.CancelledError:
            if run_id not in self._lost:
                ended = await self._safely(self._interrupted(run_id), run_id)
        except Exception as exc:
            if self._suspends(exc):
                # Its step could not be stored for a whole lease: the run stays where it is,
                # and whichever worker claims it once the lease has expired resumes it.
                log.warning("run.suspended_database_unavailable", run_id=run_id, error=str(exc))
                return
            log.exception("run.crashed", run_id=run_id)
            ended = await self._safely(self._crashed(run_id), run_id)
        finally:
            METRICS.running.dec()
            self._executions.pop(run_id, None)
            lost = run_id in self._lost
            self._lost.discard(run_id)
            self._released(run_id, ended, lost)
            if outcome is None:
                self._note_gone(run_id)
            self._ended(run_id, outcome)

    async def _claim(self, run_id: str) -> ClaimedRun | None:
        """Claim a run that was submitted here unclaimed."""
        return await self.db.runs.claim(run_id, self.owner)

    async def _attempt(
        self,
        run_id: str,
        assistant: Assistant | None,
        claimed: ClaimedRun | None,
    ) -> Outcome | None:
        if claimed is None:
            claimed = await self._claim(run_id)
        if claimed is None:
            return None  # cancelled, finished or taken meanwhile, or its thread is busy
        run, thread = claimed
        self._claimed(run)
        if assistant is None:
            assistant = await self.db.assistants.get(run["tenant_id"], run["assistant_id"])
        if assistant is None or thread is None:
            await self._fail(run, "the run's assistant or thread was deleted")
            return None
        # Only an earlier attempt can have stored events. Each attempt numbers its events
        # above every number an earlier one may have streamed (stored or not): a client that
        # resumes a stream with Last-Event-ID misses none of the new attempt's events.
        last_seq = -1
        if run["attempts"] > 1:
            stored = await self.db.runs.last_seq(run_id)
            last_seq = max(stored, (run["attempts"] - 1) * ATTEMPT_STRIDE - 1)
        execution = RunExecution(
            self.db, self.broker, self.agents, run, assistant, thread, last_seq
        )
        self._executions[run_id] = execution
        structlog.contextvars.bind_contextvars(run_id=run_id, tenant=run["tenant_id"])
        try:
            status = await execution.execute()
        finally:
            structlog.contextvars.unbind_contextvars("run_id", "tenant")
        # Its end is written: its streams and waiters here end now, and the log line (the
        # slowest part of what follows) waits until they have had their turn.
        self._ended(run_id, execution.outcome)
        asyncio.get_running_loop().call_soon(
            functools.partial(log.info, "run.finished", run_id=run_id, status=status)
        )
        self._wake_waiting(execution)
        return execution.outcome

    def _ended(self, run_id: str, outcome: Outcome | None) -> None:
        """A run's attempt here is over: end its live events and wake its waiters."""
        self.broker.close(run_id)
        done = self._done.pop(run_id, None)
        if done is not None:
            done.outcome = outcome
            done.event.set()

    async def _safely(self, ending: Any, run_id: str) -> bool:
        """Write a run's end after a failure; a failure of that is logged, not raised (the
        run stays active: a restart or the sweeper takes it up again)."""
        try:
            return bool(await ending)
        except LeaseLost:
            return False
        except Exception as exc:
            if self.db.unavailable(exc):
                log.warning("run.end_not_written", run_id=run_id, error=str(exc))
            else:
                log.exception("run.end_not_written", run_id=run_id)
            return False

    def _wake_waiting(self, execution: RunExecution) -> None:
        """After a run's end: another run of its thread may start now, here or elsewhere."""
        if execution.others_waiting:
            self._announce_queued()

    async def _fail(self, run: Run, message: str) -> bool:
        return await self._end(run, "error", message)

    async def _end(self, run: Run, status: str, error: str | None) -> bool:
        """Write the end of a run of ours (fenced by our lease on PostgreSQL); returns
        whether it was written."""
        run_id = run["run_id"]
        execution = self._executions.get(run_id)
        if execution is not None:  # with its state and events so far
            try:
                await execution.finish(status, error, "error" if error else None)
                self._wake_waiting(execution)
                return True
            except (LeaseLost, asyncio.CancelledError):
                raise
            except Exception as exc:
                if self.db.unavailable(exc):
                    raise
                # Its state or events cannot be written: the end alone is (every run ends).
                log.exception("run.end_without_state", run_id=run_id)
        if not self._owns(run_id):
            return False  # not claimed by us: not ours to end
        write = StepWrite(
            run["tenant_id"],
            run_id,
            run["thread_id"],
            run.get("state"),
            end=(status, error, "error" if status == "error" else status),
            lease_token=self._lease_token(run_id),
        )
        await self.db.steps.write(write)
        if write.others_waiting:
            self._announce_queued()
        return True

    async def _interrupted(self, run_id: str) -> bool:
        """A run's task was cancelled: it was cancelled (or interrupted by a newer run), or
        the pool is stopping. Returns whether its end was written."""
        if not self._accepting:
            return False  # stopping: left for the next start (SQLite) or handed back (stop)
        run = await self.db.runs.get_any(run_id)
        return run is not None and await self._end(run, "interrupted", None)

    async def _crashed(self, run_id: str) -> bool:
        run = await self.db.runs.get_any(run_id)
        if run is not None:
            return await self._fail(run, "internal error while running (see server logs)")
        return False

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking runs; let running ones finish within ``grace_s``, then cancel them
        (they stay queued in the database)."""
        self._accepting = False  # queued runs stay pending in the database
        running = [t for t in self._tasks.values() if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            await self._cancel(pending)

    async def _cancel(self, tasks: set[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
