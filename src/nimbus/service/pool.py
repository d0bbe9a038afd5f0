"""The scheduler a process runs, as its store calls for."""

from __future__ import annotations

from nimbus.ports import Bus, Store
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.queue_worker import QueueWorker
from nimbus.service.scheduler import LocalScheduler
from nimbus.service.workers import Workers


def worker_pool(
    db: Store,
    broker: RunBroker,
    agents: AgentFactory,
    concurrency: int = 256,
    tenant_max_running: int | None = None,
    *,
    bus: Bus | None = None,
    lease_s: float = 30.0,
    poll_s: float = 1.0,
) -> Workers:
    """A :class:`QueueWorker` when the store has a queue that processes share (PostgreSQL),
    else a :class:`LocalScheduler` (SQLite: this process is the only one)."""
    if db.queue is not None:
        return QueueWorker(
            db,
            broker,
            agents,
            concurrency,
            tenant_max_running,
            bus=bus,
            lease_s=lease_s,
            poll_s=poll_s,
        )
    return LocalScheduler(db, broker, agents, concurrency, tenant_max_running, bus=bus)
