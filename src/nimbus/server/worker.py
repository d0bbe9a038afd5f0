"""The worker pool: takes queued runs and executes them.

SQLite (one process): runs submitted by the API wait in memory, and at start-up the runs a
previous process left queued or running are resumed (nothing is silently dropped).
Scheduling is fair across tenants: each tenant has its own queue, and free slots go to the
tenants in turn (round robin), so one tenant's backlog never holds back another's runs. A
tenant may also be capped in runs executing at once (``tenant_max_running``); its other runs
wait in its queue.

PostgreSQL (any number of processes): the runs table is the queue. A fresh run submitted by
the API of this process starts here at once when a slot is free; otherwise it waits in the
table, and every worker with free slots claims the next runs (fair across tenants, capped per
tenant, ``FOR UPDATE SKIP LOCKED``) when woken by a ``queued`` signal, when one of its runs
ends, or every ``poll_s``. A claim is a lease, alive while the worker's heartbeat (a row of
``workers`` renewed every third of ``lease_s``) is; each step write carries the lease's
fencing token; a worker that loses a lease stops that run without writing. Each worker also
holds a liveness lock (:mod:`nimbus.store.liveness`) that PostgreSQL releases when its
process dies; every ``SWEEP_INTERVAL_S`` the runs of a worker whose lock is free (it died)
or whose heartbeat expired (it died or stalled) are swept back into the queue by whichever
worker looks first, and the next claim resumes each from its last stored step. See
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from collections import deque
from typing import Any

import structlog

from nimbus.exceptions import LeaseLost
from nimbus.server.agents import AgentFactory
from nimbus.server.broker import RunBroker
from nimbus.server.bus import Bus
from nimbus.server.executor import RunExecution
from nimbus.server.feed import FeedPublisher
from nimbus.server.metrics import METRICS
from nimbus.store.database import Database
from nimbus.store.db import unavailable
from nimbus.store.liveness import SWEEP_INTERVAL_S, LivenessLock
from nimbus.store.pg import UNCAPPED
from nimbus.store.writer import StepWrite

log = structlog.get_logger("nimbus.worker")
ATTEMPT_STRIDE = 1 << 20  # event numbers of attempt n start above (n - 1) * this
CLAIM_BATCH = 200  # runs claimed at most per statement
CLAIM_INTERVAL_S = 0.02  # claims at most this often: under load one claim takes many runs


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
        *,
        bus: Bus | None = None,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> None:
        self.db, self.broker, self.agents = db, broker, agents
        self.concurrency = concurrency
        self.tenant_max_running = tenant_max_running or concurrency
        self.shared = db.fast is not None  # PostgreSQL: the queue is shared, claims are leases
        self.bus = bus
        self.lease_s, self.poll_s = lease_s, poll_s
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.feed = FeedPublisher(bus, broker) if bus is not None and self.shared else None
        if self.shared:
            db.steps.outage_s = lease_s  # a step write waits out a database outage this long
        self._held: dict[str, int] = {}  # run id → fencing token of our lease
        self._claiming: set[str] = set()  # submitted here, not claimed yet: not for the poller
        self._gone: dict[str, float] = {}  # runs whose task here ended without their end
        self._lost: set[str] = set()  # runs whose lease we lost: stop, write nothing
        self._orphans: dict[str, int] = {}  # ours, but no longer executing here: to hand back
        self._executions: dict[str, RunExecution] = {}
        self._wake = asyncio.Event()
        self._backlog = True  # runs may be waiting in the queue: look when a slot frees
        self._loops: list[asyncio.Task[None]] = []
        self.liveness: LivenessLock | None = None  # PostgreSQL: see nimbus.store.liveness
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._renewed = time.monotonic()
        self._queues: dict[str, deque[str]] = {}  # per tenant, in submission order
        self._turn: deque[str] = deque()  # tenants with queued runs, next one first
        self._running: dict[str, int] = {}  # per tenant
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, Completion] = {}
        self._given: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._thread_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._reserved = 0  # slots held for runs being queued (reserve)
        self._accepting = False

    async def start(self) -> None:
        """Start taking runs, first those an earlier process left unfinished."""
        self._accepting = True
        if self.shared:
            if self.bus is not None:
                await self.bus.listen("queued", self._on_queued)
                await self.bus.listen("cancel", self._on_cancel)
                self.bus.on_reconnect.append(self._wake.set)
            if self.feed is not None:
                await self.feed.start()
            assert self.db.fast is not None
            await self.db.fast.heartbeat(self.owner, self.lease_s)  # alive before any claim
            self._renewed = time.monotonic()
            self.liveness = LivenessLock(self.db.fast, self.owner)
            await self.liveness.start()  # before any claim too: a claim without it looks dead
            self._loops = [
                asyncio.create_task(self._poll_loop(), name="nimbus-queue-poller"),
                asyncio.create_task(self._lease_loop(), name="nimbus-lease-keeper"),
            ]
            # Not cancelled at stop like the loops above: a statement cancelled halfway could
            # leave the lock's connection unusable while the runs still finish (see stop).
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="nimbus-sweeper")
            return
        for run in await self.db.runs.unfinished():
            log.info("run.recovered", run_id=run["run_id"], status=run["status"])
            self.submit(run)

    def reserve(self, tenant_id: str) -> bool:
        """Hold a slot for a run of ``tenant_id`` about to be queued, so that it is claimed
        (by :attr:`owner`) as it is queued and starts at once; False when it would have to
        wait (no free slot, the tenant at its cap, runs queued here before it) or when this
        process runs none (API only). The slot is given back by :meth:`submit`
        (``reserved=True``) or :meth:`release`."""
        if self._turn or not self._slot_free(tenant_id):
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

    def _alive(self) -> bool:
        """Whether runs may be claimed here: on PostgreSQL, only while this worker holds its
        liveness lock (a run claimed without it would look dead to every sweeper)."""
        return self.liveness is None or self.liveness.held

    def release(self, tenant_id: str) -> None:
        """Give back a slot of :meth:`reserve`."""
        self._reserved -= 1
        self._running[tenant_id] -= 1
        if not self._running[tenant_id]:
            del self._running[tenant_id]
        if not self.shared:
            self._dispatch()

    def submit(
        self,
        run: dict[str, Any],
        assistant: dict[str, Any] | None = None,
        *,
        reserved: bool = False,
    ) -> None:
        """Queue a run (already stored as pending, or claimed as it was queued: then it has
        its thread as ``claimed_thread``). ``run`` is its row; ``assistant``, read by the
        request that made it, spares the worker reading it again; ``reserved``: a slot was
        held for it (:meth:`reserve`)."""
        run_id, tenant = run["run_id"], run["tenant_id"]
        if reserved:
            self.release(tenant)
        if self.shared and "claimed_thread" not in run:
            self._submit_shared(run, assistant)
            return
        if "claimed_thread" in run:
            thread = run.pop("claimed_thread")
            if not self._accepting:  # stopping: resumed at the next start, or handed back
                if self.shared:
                    self._orphans[run_id] = run["lease_token"]
            else:
                self._open(run_id, run, assistant)
                self._start_task(run_id, tenant, (run, thread))
            return
        self._open(run_id, run, assistant)
        queue = self._queues.setdefault(tenant, deque())
        if not queue:
            self._turn.append(tenant)
        queue.append(run_id)
        self._dispatch()

    # --- PostgreSQL: the shared queue -----------------------------------------------------
    def _submit_shared(self, run: dict[str, Any], assistant: dict[str, Any] | None) -> None:
        run_id, tenant = run["run_id"], run["tenant_id"]
        if self._slot_free(tenant):
            self._open(run_id, run, assistant)
            self._claiming.add(run_id)
            self._start_task(run_id, tenant, None)
        else:
            self._announce_queued()  # for any worker with a free slot, this one included

    def _start_task(
        self,
        run_id: str,
        tenant: str,
        claimed: tuple[dict[str, Any], Any] | None,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        self._running[tenant] = self._running.get(tenant, 0) + 1
        self._tasks[run_id] = asyncio.create_task(self._run(run_id, tenant, claimed, after))

    def _open(
        self,
        run_id: str,
        run: dict[str, Any] | None = None,
        assistant: dict[str, Any] | None = None,
    ) -> None:
        """A run is about to execute here: keep its live events, and its end for waiters;
        its row and ``assistant``, when the request that made it read them, are kept for the
        worker (not read again)."""
        self.broker.open(run_id)
        self._done.setdefault(run_id, Completion())
        if run is not None and assistant is not None:
            self._given[run_id] = (run, assistant)

    def _announce_queued(self) -> None:
        """Runs wait in the shared queue: look at it when a slot is free here, and tell the
        other workers."""
        self._backlog = True
        self._wake.set()
        if self.bus is not None:
            self.bus.publish("queued", {})

    def _on_queued(self, _message: dict[str, Any]) -> None:
        self._backlog = True
        self._wake.set()

    def _on_cancel(self, message: dict[str, Any]) -> None:
        run_id = message.get("run")
        if isinstance(run_id, str):
            self.cancel(run_id)

    async def _poll_loop(self) -> None:
        """Claim waiting runs while there are free slots."""
        fast = self.db.fast
        assert fast is not None
        cap = self.tenant_max_running if self.tenant_max_running < self.concurrency else UNCAPPED
        last_claim = 0.0
        while self._accepting:
            free = self.concurrency - len(self._tasks) if self._alive() else 0
            full_batch = False
            if free > 0:
                last_claim = time.monotonic()
                try:
                    claimed = await fast.claim_next(
                        self.owner, min(free, CLAIM_BATCH), cap, self._claiming
                    )
                except Exception as exc:  # the database is away: try again later
                    log.warning("worker.claim_failed", error=str(exc))
                    claimed = []
                for run, thread in claimed:
                    run_id = run["run_id"]
                    earlier = self._tasks.get(run_id)
                    if earlier is not None:
                        # ours, but we had lost its lease (we stalled past it): that task
                        # stops without writing; this one resumes the run once it has
                        self._lose(run_id)
                        self._start_task(run_id, run["tenant_id"], (run, thread), earlier)
                        continue
                    self._open(run_id)
                    self._start_task(run_id, run["tenant_id"], (run, thread))
                full_batch = len(claimed) == min(free, CLAIM_BATCH)
                self._backlog = full_batch
            if full_batch:
                continue  # there may be more
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            # Under load, let the slots freed and the runs queued meanwhile add up: one claim
            # for them all rather than a statement per run (alone, a run is claimed at once).
            await asyncio.sleep(max(0.0, last_claim + CLAIM_INTERVAL_S - time.monotonic()))
            self._wake.clear()

    async def _lease_loop(self) -> None:
        """Renew our leases (one heartbeat for them all), stop runs whose lease we lost or
        that were cancelled elsewhere, and sweep the runs of workers that stopped renewing
        (crashed or stuck) back into the queue."""
        fast = self.db.fast
        assert fast is not None
        tick = self.lease_s / 3
        while self._accepting:
            await asyncio.sleep(tick)
            held = dict(self._held)
            try:
                await fast.heartbeat(self.owner, self.lease_s)
                self._renewed = time.monotonic()
                if held:
                    alive = await fast.held(self.owner, held)
                    for run_id in held:
                        status = alive.get(run_id)
                        if status is None:
                            self._lose(run_id)
                        elif status == "interrupted":
                            self.cancel(run_id)  # cancelled on another replica
                if self._orphans:
                    orphans = dict(self._orphans)
                    back = await fast.hand_back(self.owner, orphans)
                    for run_id in orphans:
                        self._orphans.pop(run_id, None)
                    if back:
                        log.info("worker.handed_back", runs=len(back))
                        self._announce_queued()
                # The frequent sweep (_sweep_loop) finds dead workers sooner; this one, on the
                # pool, goes on while the lock's connection is being taken again, and finds
                # the running runs a version without leases left.
                swept = await fast.sweep()
                METRICS.queue_depth.set(await fast.pending())
            except Exception as exc:
                log.warning("worker.lease_renewal_failed", error=str(exc))
                if time.monotonic() - self._renewed > self.lease_s:
                    for run_id in held:  # expired by now: another worker may take them
                        self._lose(run_id)
                continue
            self._requeued(swept)

    async def _sweep_loop(self) -> None:
        """Every ``SWEEP_INTERVAL_S``, sweep the runs of dead workers (lock free or heartbeat
        expired) back into the queue, on the connection of our liveness lock."""
        assert self.liveness is not None
        failures = 0
        while self._accepting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), SWEEP_INTERVAL_S)
            if not self._accepting:
                return
            try:
                swept = await self.liveness.sweep()
            except Exception as exc:  # the lock's keeper reconnects; the next tick retries
                if failures == 0:
                    log.warning("worker.sweep_failed", error=str(exc))
                failures += 1
                continue
            failures = 0
            self._requeued(swept or [])

    def _requeued(self, swept: list[tuple[str, str]]) -> None:
        """Runs of dead workers were swept: log them, and wake the workers for them."""
        for run_id, status in swept:
            log.warning("run.swept", run_id=run_id, status=status)
        if any(status == "pending" for _, status in swept):
            self._announce_queued()

    def _lose(self, run_id: str) -> None:
        if run_id in self._held and run_id not in self._lost:
            log.warning("run.lease_lost", run_id=run_id)
            self._lost.add(run_id)
            self.cancel(run_id)

    def _dispatch(self) -> None:
        """Start queued runs while there are free slots, one tenant after another."""
        while self._accepting and len(self._tasks) + self._reserved < self.concurrency:
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

    async def _run(
        self,
        run_id: str,
        tenant: str,
        claimed: tuple[dict[str, Any], Any] | None = None,
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
            if self.shared:
                if self._backlog:
                    self._wake.set()  # a free slot, and runs may be waiting for one
            else:
                self._dispatch()

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

    async def _execute(self, run_id: str, claimed: tuple[dict[str, Any], Any] | None) -> None:
        METRICS.running.inc()
        outcome = None
        ended = False
        try:
            given = self._given.pop(run_id, None)
            if claimed is not None:
                run: dict[str, Any] | None = claimed[0]
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
            if self.shared and unavailable(exc):
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
            token = self._held.pop(run_id, None)
            if token is not None:
                if self.feed is not None:
                    self.feed.released(run_id, ended)
                if not ended and not lost:
                    # Still ours in the database, run by nobody (its step or end could not be
                    # stored): back to the queue as soon as the database answers.
                    self._orphans[run_id] = token
            if outcome is None:
                self._note_gone(run_id)
            self._ended(run_id, outcome)

    async def _attempt(
        self,
        run_id: str,
        assistant: dict[str, Any] | None,
        claimed: tuple[dict[str, Any], Any] | None,
    ) -> tuple[str, str | None, dict[str, Any]] | None:
        if claimed is None:
            try:
                claimed = await self.db.runs.claim(run_id, self.owner)
            finally:
                self._claiming.discard(run_id)
        if claimed is None:
            return None  # cancelled, finished or taken meanwhile, or its thread is busy
        run, thread = claimed
        if self.shared:
            self._held[run_id] = run["lease_token"]
            if self.feed is not None:
                self.feed.held(run_id, run["lease_token"])
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

    def _ended(self, run_id: str, outcome: tuple[str, str | None, dict[str, Any]] | None) -> None:
        """A run's attempt here is over: end its live events and wake its waiters."""
        self.broker.close(run_id)
        done = self._done.pop(run_id, None)
        if done is not None:
            done.outcome = outcome
            done.event.set()

    @staticmethod
    async def _safely(ending: Any, run_id: str) -> bool:
        """Write a run's end after a failure; a failure of that is logged, not raised (the
        run stays active: a restart or the sweeper takes it up again)."""
        try:
            return bool(await ending)
        except LeaseLost:
            return False
        except Exception as exc:
            if unavailable(exc):
                log.warning("run.end_not_written", run_id=run_id, error=str(exc))
            else:
                log.exception("run.end_not_written", run_id=run_id)
            return False

    def _wake_waiting(self, execution: RunExecution) -> None:
        """After a run's end: another run of its thread may start now, here or elsewhere."""
        if execution.others_waiting:
            self._announce_queued()

    async def _fail(self, run: dict[str, Any], message: str) -> bool:
        return await self._end(run, "error", message)

    async def _end(self, run: dict[str, Any], status: str, error: str | None) -> bool:
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
                if unavailable(exc):
                    raise
                # Its state or events cannot be written: the end alone is (every run ends).
                log.exception("run.end_without_state", run_id=run_id)
        if self.shared and run_id not in self._held:
            return False  # not claimed by us: not ours to end
        write = StepWrite(
            run["tenant_id"],
            run_id,
            run["thread_id"],
            run.get("state"),
            end=(status, error, "error" if status == "error" else status),
            lease_token=self._held.get(run_id, 0),
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
        """Stop taking runs; let running ones finish within ``grace_s``, then cancel them:
        they stay queued in the database and resume at the next start (SQLite) or are handed
        back to the queue for another worker (PostgreSQL)."""
        self._accepting = False  # queued runs stay pending in the database
        self._wake.set()
        self._stopping.set()
        for loop in self._loops:
            loop.cancel()
        if self._sweeper is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
        running = [t for t in self._tasks.values() if not t.done()]
        if running:
            keeper = None
            if self.shared:  # keep our leases while the runs finish
                keeper = asyncio.create_task(self._keep_leases())
            _, pending = await asyncio.wait(running, timeout=grace_s)
            held = {
                run_id: self._held[run_id]
                for run_id, t in self._tasks.items()
                if t in pending and run_id in self._held
            }
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if keeper is not None:
                keeper.cancel()
            held.update(self._orphans)
            if held and self.db.fast is not None:
                with contextlib.suppress(Exception):
                    back = await self.db.fast.hand_back(self.owner, held)
                    log.info("worker.handed_back", runs=len(back))
                    if back and self.bus is not None:
                        self.bus.publish("queued", {})  # for the other workers: this one stops
        if self.shared and self.db.fast is not None:
            with contextlib.suppress(Exception):
                await self.db.fast.retire(self.owner)  # anything left is swept at once
        if self.liveness is not None:  # last: until now our runs were ours to finish
            await self.liveness.close()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        if self.bus is not None and self.shared:
            await self.bus.unlisten("queued", self._on_queued)
            await self.bus.unlisten("cancel", self._on_cancel)

    async def _keep_leases(self) -> None:
        fast = self.db.fast
        assert fast is not None
        while True:
            await asyncio.sleep(self.lease_s / 3)
            with contextlib.suppress(Exception):
                await fast.heartbeat(self.owner, self.lease_s)
