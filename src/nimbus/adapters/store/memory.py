"""The store in memory: the twin of the SQL stores (:mod:`nimbus.ports`), for the tests.

It keeps what the service reads and writes (assistants, threads, runs, their events and the
threads' checkpoints) in dicts, with the behaviour of SQLite's store: one process, so no
shared queue (:attr:`MemoryStore.queue` is None), claims that are not leases (a run that was
running is claimed again when a process resumes it) and lease tokens ignored. The contract
suite (``tests/ports``) holds it to the SQL stores' behaviour.

Values go in and come out as JSON does (copies, parsed again), so that a caller who mutates
what it wrote or read changes nothing stored, as with a database.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from nimbus.exceptions import ThreadBusy
from nimbus.records import (
    Assistant,
    ClaimedRun,
    Event,
    Queued,
    Run,
    RunStatus,
    StepWrite,
    ThreadHead,
    ThreadStatus,
    dump_json,
    load_json,
    new_id,
)

if TYPE_CHECKING:
    from nimbus.ports import Store

ACTIVE = ("pending", "running")


def _copy(value: Any) -> Any:
    """``value`` as a database hands it back: through JSON."""
    return load_json(dump_json(value))


@dataclass
class StoredThread:
    """A thread's row, and its checkpoints (oldest first)."""

    tenant_id: str
    thread_id: str
    status: ThreadStatus = "idle"
    values: dict[str, Any] = field(default_factory=dict)
    checkpoint_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def head(self) -> ThreadHead:
        """What a claim reads of it."""
        return {
            "thread_id": self.thread_id,
            "values": _copy(self.values),
            "checkpoint_id": self.checkpoint_id,
        }


class MemoryStore:
    """Assistants, threads and runs in memory (see the module's docstring); satisfies
    :class:`nimbus.ports.Store`."""

    #: runs are queued in this process (no queue that processes share)
    queue = None

    def __init__(self) -> None:
        self.assistant_rows: dict[tuple[str, str], Assistant] = {}
        self.threads: dict[tuple[str, str], StoredThread] = {}
        self.run_rows: dict[str, Run] = {}  # in the order they were queued
        self.run_events: dict[str, list[Event]] = {}
        self.runs = MemoryRuns(self)
        self.assistants = MemoryAssistants(self)
        self.steps = MemorySteps(self)
        self._last_stamp = datetime.min.replace(tzinfo=UTC)

    def unavailable(self, exc: BaseException) -> bool:
        """Memory is always there: no error says it cannot be reached."""
        return False

    def stamp(self) -> datetime:
        """The time now, later than every stamp before (runs queued within one microsecond
        of each other keep their order)."""
        stamp = max(datetime.now(UTC), self._last_stamp + timedelta(microseconds=1))
        self._last_stamp = stamp
        return stamp

    # --- seeding (what the API's routes do to a database) ------------------------------------
    def add_assistant(
        self,
        tenant_id: str,
        assistant_id: str | None = None,
        *,
        graph_id: str = "agent",
        name: str = "a",
        config: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Assistant:
        """A new assistant of ``tenant_id`` (version 1)."""
        stamp = self.stamp()
        assistant: Assistant = {
            "assistant_id": assistant_id or new_id(),
            "tenant_id": tenant_id,
            "graph_id": graph_id,
            "name": name,
            "description": None,
            "config": _copy(config or {}),
            "context": _copy(context or {}),
            "metadata": _copy(metadata or {}),
            "version": 1,
            "created_at": stamp,
            "updated_at": stamp,
        }
        self.assistant_rows[tenant_id, assistant["assistant_id"]] = assistant
        return cast(Assistant, dict(assistant))

    def add_thread(
        self,
        tenant_id: str,
        thread_id: str | None = None,
        *,
        values: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """A new idle thread of ``tenant_id``; its id."""
        thread = StoredThread(tenant_id, thread_id or new_id())
        thread.values, thread.metadata = _copy(values or {}), _copy(metadata or {})
        self.threads[tenant_id, thread.thread_id] = thread
        return thread.thread_id

    def thread(self, tenant_id: str, thread_id: str) -> StoredThread | None:
        """One thread of the tenant, or None."""
        return self.threads.get((tenant_id, thread_id))

    def queue_run(
        self,
        tenant_id: str,
        thread_id: str,
        assistant_id: str,
        *,
        kwargs: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        multitask_strategy: str = "enqueue",
    ) -> Queued | None:
        """Queue a run on an existing thread, as ``Database.runs.create`` does; None when the
        tenant has no such thread. The thread becomes busy. When it has active runs,
        ``reject`` raises :class:`ThreadBusy` (nothing changes), ``interrupt`` and
        ``rollback`` mark them interrupted (``Queued.interrupted``), ``enqueue`` queues the
        new run behind them."""
        thread = self.thread(tenant_id, thread_id)
        if thread is None:
            return None
        active = self.active(tenant_id, thread_id)
        if active and multitask_strategy == "reject":
            raise ThreadBusy(thread_id)
        stamp = self.stamp()
        thread.status = "busy"
        interrupted: list[str] = []
        if active and multitask_strategy in ("interrupt", "rollback"):
            for run_id in active:
                other = self.run_rows[run_id]
                other["status"], other["updated_at"] = "interrupted", stamp
            interrupted = active
        run: Run = {
            "run_id": new_id(),
            "tenant_id": tenant_id,
            "thread_id": thread_id,
            "assistant_id": assistant_id,
            "status": "pending",
            "metadata": _copy(metadata or {}),
            "kwargs": _copy(kwargs or {}),
            "multitask_strategy": multitask_strategy,
            "state": None,
            "error": None,
            "attempts": 0,
            "created_at": stamp,
            "updated_at": stamp,
            "lease_owner": None,
            "lease_token": 0,
        }
        self.run_rows[run["run_id"]] = run
        return Queued(cast(Run, dict(run)), interrupted)

    def active(self, tenant_id: str, thread_id: str, but: str | None = None) -> list[str]:
        """The ids of the thread's pending and running runs (other than ``but``)."""
        return [
            run_id
            for run_id, run in self.run_rows.items()
            if run["tenant_id"] == tenant_id
            and run["thread_id"] == thread_id
            and run["status"] in ACTIVE
            and run_id != but
        ]


class MemoryRuns:
    """:class:`nimbus.ports.RunStore` in memory."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def get_any(self, run_id: str) -> Run | None:
        """A run by id, whatever its tenant."""
        run = self.store.run_rows.get(run_id)
        return None if run is None else _copy_run(run)

    async def unfinished(self) -> list[Run]:
        """Runs queued or running, oldest first."""
        active = [r for r in self.store.run_rows.values() if r["status"] in ACTIVE]
        return [_copy_run(r) for r in sorted(active, key=lambda r: r["created_at"])]

    async def claim(self, run_id: str, owner: str) -> ClaimedRun | None:
        """As SQLite's claim: a pending run, or a running one (resumed after a restart),
        becomes running with one more attempt, its thread busy again; None when the run is
        gone or no longer active. Runs of one thread are kept one at a time by the
        scheduler of the one process, not by the claim (``owner`` is not recorded)."""
        store = self.store
        run = store.run_rows.get(run_id)
        if run is None or run["status"] not in ACTIVE:
            return None
        run["status"], run["attempts"] = "running", run["attempts"] + 1
        run["updated_at"] = store.stamp()
        thread = store.thread(run["tenant_id"], run["thread_id"])
        if thread is not None:
            thread.status = "busy"
        return _copy_run(run), None if thread is None else thread.head()

    async def last_seq(self, run_id: str) -> int:
        """The number of the run's last stored event (-1: none)."""
        return max((e[0] for e in self.store.run_events.get(run_id, ())), default=-1)

    async def events(self, run_id: str, after: int = -1) -> list[Event]:
        """The run's stored events numbered above ``after``, in order."""
        stored = self.store.run_events.get(run_id, ())
        return sorted((e for e in stored if e[0] > after), key=lambda e: e[0])

    async def ended(self, run_id: str) -> bool:
        """Whether the run has ended (or is gone)."""
        run = self.store.run_rows.get(run_id)
        return run is None or run["status"] not in ACTIVE


def _copy_run(run: Run) -> Run:
    """A run's row as a read hands it out: its JSON values copies."""
    out = cast(Run, dict(run))
    out["metadata"], out["kwargs"] = _copy(run["metadata"]), _copy(run["kwargs"])
    out["state"] = _copy(run["state"])
    return out


class MemoryAssistants:
    """:class:`nimbus.ports.AssistantStore` in memory."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def get(self, tenant_id: str, assistant_id: str) -> Assistant | None:
        """One assistant of one tenant (another tenant's of that id is not seen)."""
        found = self.store.assistant_rows.get((tenant_id, assistant_id))
        if found is None:
            return None
        out = cast(Assistant, dict(found))
        out["config"], out["context"] = _copy(found["config"]), _copy(found["context"])
        out["metadata"] = _copy(found["metadata"])
        return out


class MemorySteps:
    """:class:`nimbus.ports.StepSink` in memory: each step is written at once, as SQLite's
    ``_write_steps`` writes it (lease tokens are ignored: one process, no leases)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        #: kept for the port (nothing here waits out an outage)
        self.outage_s = 0.0

    async def write(self, step: StepWrite) -> str | None:
        """Write ``step``; for a run's end, its final status (``interrupted`` when it was
        cancelled meanwhile)."""
        return self._write(step)

    def submit(self, step: StepWrite) -> asyncio.Future[str | None]:
        """Write ``step`` now; the future, done already, holds what :meth:`write` returns."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._write(step))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _write(self, step: StepWrite) -> str | None:
        store = self.store
        stamp = store.stamp()
        thread = store.thread(step.tenant_id, step.thread_id)
        values = None if step.values is None else _copy(step.values)
        if thread is not None:
            if values is not None:
                thread.values, thread.checkpoint_id = values, step.checkpoint_id
                thread.checkpoints.append(
                    {
                        "checkpoint_id": step.checkpoint_id,
                        "parent_id": step.parent_id,
                        "run_id": step.run_id,
                        "step": step.step,
                        "values": _copy(values),
                        "next": list(step.next_nodes),
                        "created_at": stamp,
                    }
                )
            if step.end is not None:
                # the thread stays busy while another run of it is active
                waiting = bool(store.active(step.tenant_id, step.thread_id, but=step.run_id))
                step.others_waiting = waiting
                thread.status = "busy" if waiting else cast(ThreadStatus, step.end[2])
        run = store.run_rows.get(step.run_id)
        result = None
        if run is not None:
            run["state"], run["updated_at"] = _copy(step.state), stamp
        if step.end is not None:
            status, error, _ = step.end
            if run is None or run["status"] == "interrupted":
                result = "interrupted"  # cancelled meanwhile: it stays so
            else:
                run["status"], run["error"] = cast(RunStatus, status), error
                result = status
        if step.events:
            stored = store.run_events.setdefault(step.run_id, [])
            stored.extend((seq, name, _copy(data)) for seq, name, data in step.events)
        return result


if TYPE_CHECKING:

    def _a_store(store: MemoryStore) -> Store:
        """mypy holds the twin to the port here."""
        return store
