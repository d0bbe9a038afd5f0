"""The scheduler of a process that is the only one (SQLite): runs wait in memory.

Runs submitted by the API wait here, and at start-up the runs a previous process left
queued or running are resumed (nothing is silently dropped). Scheduling is fair across
tenants: each tenant has its own queue, and free slots go to the tenants in turn (round
robin), so one tenant's backlog never holds back another's runs. A tenant may also be capped
in runs executing at once (``tenant_max_running``); its other runs wait in its queue.
"""

from __future__ import annotations

from collections import deque

import structlog

from nimbus.ports import Bus, Store
from nimbus.records import Assistant, Queued
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.metrics import METRICS
from nimbus.service.workers import Workers

log = structlog.get_logger("nimbus.worker")


class LocalScheduler(Workers):
    """Runs queued in this process, started fairly across tenants as slots free up."""

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
        super().__init__(db, broker, agents, concurrency, tenant_max_running, bus=bus)
        self._queues: dict[str, deque[str]] = {}  # per tenant, in submission order
        self._turn: deque[str] = deque()  # tenants with queued runs, next one first

    async def start(self) -> None:
        """Start taking runs, first those an earlier process left unfinished."""
        await super().start()
        for run in await self.db.runs.unfinished():
            log.info("run.recovered", run_id=run["run_id"], status=run["status"])
            self.submit(Queued(run))

    def reserve(self, tenant_id: str) -> bool:
        """See :meth:`Workers.reserve`: never ahead of runs queued here."""
        return not self._turn and super().reserve(tenant_id)

    def release(self, tenant_id: str) -> None:
        """See :meth:`Workers.release`."""
        super().release(tenant_id)
        self._dispatch()

    def submit(
        self, queued: Queued, assistant: Assistant | None = None, *, reserved: bool = False
    ) -> None:
        """See :meth:`Workers.submit`."""
        run = queued.run
        run_id, tenant = run["run_id"], run["tenant_id"]
        if reserved:
            self.release(tenant)
        if queued.claimed:
            if self._accepting:  # else stopping: it is resumed at the next start
                self._open(run_id, run, assistant)
                self._start_task(run_id, tenant, (run, queued.thread))
            return
        self._open(run_id, run, assistant)
        queue = self._queues.setdefault(tenant, deque())
        if not queue:
            self._turn.append(tenant)
        queue.append(run_id)
        self._dispatch()

    def _freed(self) -> None:
        self._dispatch()

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
            self._start_task(run_id, tenant, None)
        METRICS.queue_depth.set(sum(len(q) for q in self._queues.values()))
