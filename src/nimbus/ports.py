"""What the service needs from the world around it, as Protocols.

The service (:mod:`nimbus.service`) is written against these alone; each database has one
implementation of each (:mod:`nimbus.adapters.store`), the in-memory store included, and one
contract suite (``tests/ports``) holds them all to the same behaviour.

- :class:`Store`: the runs, assistants and step writes the service reads and writes, and
  :attr:`Store.queue`, the shared run queue when there is one (PostgreSQL: any number of
  worker processes claim from it); None when runs are queued in the one process (SQLite).
- :class:`Bus`: signals between processes (PostgreSQL's LISTEN/NOTIFY or Redis).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any, Protocol

from nimbus.core.model import Model
from nimbus.records import ACTIVE, Assistant, ClaimedRun, Event, Queued, Run, StepWrite


class RunStore(Protocol):
    """The runs as a worker and a stream follower read them (any tenant: ids are unique)."""

    async def get_any(self, run_id: str) -> Run | None:
        """A run by id, whatever its tenant."""
        ...

    async def unfinished(self) -> list[Run]:
        """Runs queued or running, oldest first: what a one-process server resumes at start."""
        ...

    async def claim(self, run_id: str, owner: str) -> ClaimedRun | None:
        """Take one run for ``owner``; None when it is not claimable now (taken, ended, or
        its thread busy with another run)."""
        ...

    async def last_seq(self, run_id: str) -> int:
        """The number of the run's last stored event (-1: none)."""
        ...

    async def events(self, run_id: str, after: int = -1) -> list[Event]:
        """The run's stored events numbered above ``after``."""
        ...

    async def ended(self, run_id: str) -> bool:
        """Whether the run has ended (or is gone)."""
        ...


class AssistantStore(Protocol):
    """Assistants as a worker reads them."""

    async def get(self, tenant_id: str, assistant_id: str) -> Assistant | None:
        """One assistant of one tenant."""
        ...


class StepSink(Protocol):
    """Where the steps of runs are written (in batches: see ``adapters/store/writer.py``)."""

    #: how long a write waits out a database that cannot be reached before it fails
    outage_s: float

    async def write(self, step: StepWrite) -> str | None:
        """Write one step; the status the run was left with by an end (else None)."""
        ...

    def submit(self, step: StepWrite) -> asyncio.Future[str | None]:
        """Queue one step for writing without waiting for it."""
        ...


class LivenessLock(Protocol):
    """A worker's proof of life that the database drops the moment its process dies."""

    @property
    def held(self) -> bool:
        """Whether the worker holds its lock now (as far as it knows)."""
        ...

    async def start(self) -> None:
        """Take the lock, and keep it from now on."""
        ...

    async def close(self) -> None:
        """Give the lock up."""
        ...

    async def sweep(self) -> list[tuple[str, str]] | None:
        """Hand the runs of dead workers back to the queue: (run id, status now) of each,
        None when the lock is not held now."""
        ...


class RunQueue(Protocol):
    """The run queue that worker processes share: claims are leases, alive while their
    worker's heartbeat is, each write fenced by its lease's token."""

    async def claim_next(
        self, owner: str, limit: int, tenant_cap: int | None, skip: Collection[str] = ()
    ) -> list[ClaimedRun]:
        """Claim up to ``limit`` waiting runs for ``owner``, fairly across tenants, at most
        ``tenant_cap`` running per tenant (None: no cap), none of ``skip``."""
        ...

    async def heartbeat(self, owner: str, lease_s: float) -> None:
        """``owner`` is alive for ``lease_s`` seconds more: so are its leases."""
        ...

    async def held(self, owner: str, held: dict[str, int]) -> dict[str, str]:
        """What became of the runs ``owner`` holds (run id → fencing token): the status of
        each still its own, ``ended`` for those it ended; the lost ones are left out."""
        ...

    async def hand_back(self, owner: str, leases: dict[str, int]) -> list[str]:
        """Release leases of runs ``owner`` no longer executes: back to the queue."""
        ...

    async def sweep(self) -> list[tuple[str, str]]:
        """Release the leases of workers whose heartbeat expired: (run id, status now)."""
        ...

    async def pending(self, tenant_id: str | None = None) -> int:
        """How many runs wait (of one tenant, if given)."""
        ...

    async def retire(self, owner: str) -> None:
        """``owner`` stops: whatever it still holds is swept at once."""
        ...

    def liveness(self, owner: str) -> LivenessLock:
        """``owner``'s liveness lock (not taken yet)."""
        ...


class Store(Protocol):
    """The database, as the service sees it."""

    @property
    def runs(self) -> RunStore: ...

    @property
    def assistants(self) -> AssistantStore: ...

    @property
    def steps(self) -> StepSink: ...

    @property
    def queue(self) -> RunQueue | None:
        """The shared run queue (PostgreSQL); None: runs are queued in this process."""
        ...

    def unavailable(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the database cannot be reached (a 503, not a 500)."""
        ...


class RunRequests(RunStore, Protocol):
    """The runs as the API's requests queue, read and cancel them."""

    async def create(
        self,
        tenant_id: str,
        *,
        thread_id: str | None,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        if_not_exists: str = "reject",
        temporary: bool = False,
        idempotency: tuple[str, str] | None = None,
        claim_as: str | None = None,
    ) -> Queued | None:
        """Queue a run for the assistant of that id (the general path: a thread to create,
        an Idempotency-Key); None when the thread does not exist and may not be created."""
        ...

    async def create_with_assistant(
        self,
        tenant_id: str,
        *,
        thread_id: str,
        assistant_id: str,
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        multitask_strategy: str,
        claim_as: str | None = None,
    ) -> Queued | None:
        """Queue a run on an existing thread for the assistant named by id, graph or name,
        read in the same statement; None (nothing queued) when either is missing."""
        ...

    async def get(
        self, tenant_id: str, run_id: str, thread_id: str | None = None
    ) -> dict[str, Any] | None:
        """One run of one tenant (of the thread, if given)."""
        ...

    async def status(self, run_id: str) -> str | None:
        """A run's status now."""
        ...

    async def cancel(self, tenant_id: str, run_id: str, thread_id: str | None, action: str) -> bool:
        """Mark an active run interrupted (``action``: interrupt or rollback)."""
        ...

    async def cancel_many(
        self,
        tenant_id: str,
        action: str,
        *,
        run_ids: list[str] | None = None,
        thread_id: str | None = None,
        assistant_id: str | None = None,
        statuses: tuple[str, ...] = ACTIVE,
    ) -> list[str]:
        """Mark a tenant's active runs interrupted (by id, else by status); their ids."""
        ...

    async def delete_of_assistant(self, tenant_id: str, assistant_id: str) -> int:
        """Delete the ended runs of an assistant (with their events); how many."""
        ...


class AssistantRequests(AssistantStore, Protocol):
    """Assistants as runs name them."""

    async def find(self, tenant_id: str, id_or_name: str) -> Assistant | None:
        """By id; else the first made from the graph of that name; else the newest so named."""
        ...

    async def ensure_system(self, tenant_id: str, graph_id: str) -> Assistant:
        """The tenant's assistant of a graph, made on first use (as LangGraph does)."""
        ...


class ThreadRequests(Protocol):
    """Threads as runs' requests read and delete them."""

    async def get(self, tenant_id: str, thread_id: str) -> dict[str, Any] | None:
        """One thread of one tenant."""
        ...

    async def delete(self, tenant_id: str, thread_id: str) -> bool:
        """Delete a thread (a stateless run's, once it is over)."""
        ...


class RunRequestStore(Protocol):
    """The store as :class:`nimbus.service.runs.RunService` uses it."""

    @property
    def runs(self) -> RunRequests: ...

    @property
    def assistants(self) -> AssistantRequests: ...

    @property
    def threads(self) -> ThreadRequests: ...


class ModelCatalog(Protocol):
    """The models the operator offers, by model id (``provider:name``)."""

    #: the model id of agents that name none
    default: str

    def check(self, model_id: str) -> tuple[str, str]:
        """``(provider, name)`` of a well-formed model id, else ConfigError saying why."""
        ...

    def build(self, model_id: str) -> Model:
        """A new model instance for ``model_id`` (ConfigError when it names none)."""
        ...


Handler = Callable[[dict[str, Any]], None]


class Bus(Protocol):
    """Signals between processes: fire-and-forget messages on named channels."""

    #: the largest message it carries, in bytes
    max_payload: int
    #: called after the bus reconnected (messages may have been lost meanwhile)
    on_reconnect: list[Callable[[], None]]

    def publish(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` on ``channel`` (in the background)."""
        ...

    async def listen(self, channel: str, handler: Handler) -> None:
        """Call ``handler`` with each message on ``channel``."""
        ...

    async def unlisten(self, channel: str, handler: Handler) -> None:
        """Stop calling ``handler``."""
        ...
