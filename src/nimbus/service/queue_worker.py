"""A worker of the run queue that any number of processes share (PostgreSQL).

The runs table is the queue. A fresh run submitted by the API of this process starts here at
once when a slot is free; otherwise it waits in the table, and every worker with free slots
claims the next runs (fair across tenants, capped per tenant, ``FOR UPDATE SKIP LOCKED``)
when woken by a ``queued`` signal, when one of its runs ends, or every ``poll_s``. A claim
is a lease, alive while the worker's heartbeat (a row of ``workers`` renewed every third of
``lease_s``) is; each step write carries the lease's fencing token; a worker that loses a
lease stops that run without writing. Each worker also holds a liveness lock
(:meth:`nimbus.ports.RunQueue.liveness`) that PostgreSQL releases when its process dies;
every :data:`SWEEP_INTERVAL_S` the runs of a worker whose lock is free (it died) or whose
heartbeat expired (it died or stalled) are swept back into the queue by whichever worker
looks first, and the next claim resumes each from its last stored step. See
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from nimbus.ports import Bus, LivenessLock, Store
from nimbus.records import Assistant, ClaimedRun, Queued, Run
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.feed import FeedPublisher
from nimbus.service.metrics import METRICS
from nimbus.service.workers import Workers

log = structlog.get_logger("nimbus.worker")
CLAIM_BATCH = 200  # runs claimed at most per statement
CLAIM_INTERVAL_S = 0.02  # claims at most this often: under load one claim takes many runs
# Every half second: from a worker's death to its runs back in the queue takes at most this
# plus one statement (well within the 2 s aimed at on a loaded machine), and with nobody
# dead the statement costs a few index probes per worker holding runs (0.26 ms measured,
# round trip included, for 10 workers holding 3,000 runs).
SWEEP_INTERVAL_S = 0.5


class QueueWorker(Workers):
    """Claims runs from the shared queue while it has free slots; holds them by lease."""

    def __init__(
        self,
        db: Store,
        broker: RunBroker,
        agents: AgentFactory,
        concurrency: int = 256,
        tenant_max_running: int | None = None,
        *,
        bus: Bus | None = None,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
    ) -> None:
        super().__init__(db, broker, agents, concurrency, tenant_max_running, bus=bus)
        queue = db.queue
        assert queue is not None, "a queue worker needs a store with a shared queue"
        self.queue = queue
        self.lease_s, self.poll_s = lease_s, poll_s
        self.feed = FeedPublisher(bus, broker) if bus is not None else None
        db.steps.outage_s = lease_s  # a step write waits out a database outage this long
        self._held: dict[str, int] = {}  # run id → fencing token of our lease
        self._claiming: set[str] = set()  # submitted here, not claimed yet: not for the poller
        self._orphans: dict[str, int] = {}  # ours, but no longer executing here: to hand back
        self._wake = asyncio.Event()
        self._backlog = True  # runs may be waiting in the queue: look when a slot frees
        self._loops: list[asyncio.Task[None]] = []
        self.liveness: LivenessLock | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._renewed = time.monotonic()
        # With a per-tenant cap, every claim goes through the queue's claim statement, which
        # counts the tenant's running runs in the database: a run claimed as it is queued, or
        # on its own, is not counted there until its claim commits, and one claimed by the
        # statement meanwhile could pass the cap.
        self.capped = self.tenant_max_running < self.concurrency

    async def start(self) -> None:
        """Start claiming runs: alive (heartbeat and liveness lock) before the first claim."""
        await super().start()
        if self.bus is not None:
            await self.bus.listen("queued", self._on_queued)
            await self.bus.listen("cancel", self._on_cancel)
            self.bus.on_reconnect.append(self._wake.set)
        if self.feed is not None:
            await self.feed.start()
        await self.queue.heartbeat(self.owner, self.lease_s)  # alive before any claim
        self._renewed = time.monotonic()
        self.liveness = self.queue.liveness(self.owner)
        await self.liveness.start()  # before any claim too: a claim without it looks dead
        self._loops = [
            asyncio.create_task(self._poll_loop(), name="nimbus-queue-poller"),
            asyncio.create_task(self._lease_loop(), name="nimbus-lease-keeper"),
        ]
        # Not cancelled at stop like the loops above: a statement cancelled halfway could
        # leave the lock's connection unusable while the runs still finish (see stop).
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="nimbus-sweeper")

    def submit(
        self, queued: Queued, assistant: Assistant | None = None, *, reserved: bool = False
    ) -> None:
        """See :meth:`Workers.submit`: a run not claimed as it was queued starts here if a
        slot is free, else it waits in the shared queue for any worker."""
        run = queued.run
        run_id, tenant = run["run_id"], run["tenant_id"]
        if reserved:
            self.release(tenant)
        if not queued.claimed:
            self._submit_unclaimed(run, assistant)
        elif not self._accepting:  # stopping: handed back to the queue
            self._orphans[run_id] = run.get("lease_token", 0)
        else:
            self._open(run_id, run, assistant)
            self._start_task(run_id, tenant, (run, queued.thread))

    def reserve(self, tenant_id: str) -> bool:
        """See :meth:`Workers.reserve`: never for a capped tenant (see ``capped``)."""
        return not self.capped and super().reserve(tenant_id)

    def _submit_unclaimed(self, run: Run, assistant: Assistant | None) -> None:
        run_id, tenant = run["run_id"], run["tenant_id"]
        if not self.capped and self._slot_free(tenant):
            self._open(run_id, run, assistant)
            self._claiming.add(run_id)
            self._start_task(run_id, tenant, None)
        else:
            self._announce_queued()  # for any worker with a free slot, this one included

    # --- the hooks of Workers --------------------------------------------------------------
    def _freed(self) -> None:
        if self._backlog:
            self._wake.set()  # a free slot, and runs may be waiting for one

    def _announce_queued(self) -> None:
        """Runs wait in the shared queue: look at it when a slot is free here, and tell the
        other workers."""
        self._backlog = True
        self._wake.set()
        if self.bus is not None:
            self.bus.publish("queued", {})

    def _claimed(self, run: Run) -> None:
        token = run.get("lease_token", 0)
        self._held[run["run_id"]] = token
        if self.feed is not None:
            self.feed.held(run["run_id"], token)

    def _released(self, run_id: str, ended: bool, lost: bool) -> None:
        token = self._held.pop(run_id, None)
        if token is None:
            return
        if self.feed is not None:
            self.feed.released(run_id, ended)
        if not ended and not lost:
            # Still ours in the database, run by nobody (its step or end could not be
            # stored): back to the queue as soon as the database answers.
            self._orphans[run_id] = token

    def _owns(self, run_id: str) -> bool:
        return run_id in self._held

    def _lease_token(self, run_id: str) -> int:
        return self._held.get(run_id, 0)

    def _alive(self) -> bool:
        """Runs may be claimed here only while this worker holds its liveness lock (a run
        claimed without it would look dead to every sweeper)."""
        return self.liveness is None or self.liveness.held

    def _suspends(self, exc: BaseException) -> bool:
        return self.db.unavailable(exc)

    async def _claim(self, run_id: str) -> ClaimedRun | None:
        try:
            return await super()._claim(run_id)
        finally:
            self._claiming.discard(run_id)

    # --- signals ---------------------------------------------------------------------------
    def _on_queued(self, _message: dict[str, Any]) -> None:
        self._backlog = True
        self._wake.set()

    def _on_cancel(self, message: dict[str, Any]) -> None:
        run_id = message.get("run")
        if isinstance(run_id, str):
            self.cancel(run_id)

    # --- loops -----------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        """Claim waiting runs while there are free slots."""
        queue = self.queue
        cap = self.tenant_max_running if self.tenant_max_running < self.concurrency else None
        last_claim = 0.0
        while self._accepting:
            free = self.concurrency - len(self._tasks) if self._alive() else 0
            full_batch = False
            if free > 0:
                last_claim = time.monotonic()
                try:
                    claimed = await queue.claim_next(
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
        queue = self.queue
        tick = self.lease_s / 3
        while self._accepting:
            await asyncio.sleep(tick)
            held = dict(self._held)
            try:
                await queue.heartbeat(self.owner, self.lease_s)
                self._renewed = time.monotonic()
                if held:
                    alive = await queue.held(self.owner, held)
                    for run_id in held:
                        status = alive.get(run_id)
                        if status is None:
                            self._lose(run_id)
                        elif status == "interrupted":
                            self.cancel(run_id)  # cancelled on another replica
                if self._orphans:
                    orphans = dict(self._orphans)
                    back = await queue.hand_back(self.owner, orphans)
                    for run_id in orphans:
                        self._orphans.pop(run_id, None)
                    if back:
                        log.info("worker.handed_back", runs=len(back))
                        self._announce_queued()
                # The frequent sweep (_sweep_loop) finds dead workers sooner; this one, on the
                # pool, goes on while the lock's connection is being taken again, and finds
                # the running runs a version without leases left.
                swept = await queue.sweep()
                METRICS.queue_depth.set(await queue.pending())
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

    # --- stopping --------------------------------------------------------------------------
    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming; let running runs finish within ``grace_s`` (their leases kept
        meanwhile), then cancel them and hand them back to the queue for another worker."""
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
            keeper = asyncio.create_task(self._keep_leases())  # our leases, while they finish
            _, pending = await asyncio.wait(running, timeout=grace_s)
            held = {
                run_id: self._held[run_id]
                for run_id, t in self._tasks.items()
                if t in pending and run_id in self._held
            }
            await self._cancel(pending)
            keeper.cancel()
            held.update(self._orphans)
            if held:
                with contextlib.suppress(Exception):
                    back = await self.queue.hand_back(self.owner, held)
                    log.info("worker.handed_back", runs=len(back))
                    if back and self.bus is not None:
                        self.bus.publish("queued", {})  # for the other workers: this one stops
        with contextlib.suppress(Exception):
            await self.queue.retire(self.owner)  # anything left is swept at once
        if self.liveness is not None:  # last: until now our runs were ours to finish
            await self.liveness.close()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        if self.bus is not None:
            await self.bus.unlisten("queued", self._on_queued)
            await self.bus.unlisten("cancel", self._on_cancel)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            with contextlib.suppress(Exception):
                await self.queue.heartbeat(self.owner, self.lease_s)
