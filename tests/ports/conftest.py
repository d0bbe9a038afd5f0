"""The backends of the contract suite: every test of ``tests/ports`` runs on the store in
memory, on SQLite and on PostgreSQL, each seeded the same way through a :class:`Backend`.

Where the stores may differ by design, a backend says which way it goes (``leases``,
``tells_others_waiting``) and the tests hold each one to its own side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from nimbus.adapters.store.database import Database
from nimbus.adapters.store.memory import MemoryStore
from nimbus.ports import Store
from nimbus.records import ClaimedRun, Queued, Run, StepWrite


class Backend:
    """One store under test, and the seeding the API's routes would do to it."""

    #: the store's claims are leases (PostgreSQL's shared queue): a run of a thread is
    #: claimable only when no other run of it is running or older, a claimed run ends only
    #: when its end is written, and a write with a stale lease token is refused
    leases = False
    #: a run's end says whether other runs of its thread are waiting (``others_waiting``)
    tells_others_waiting = True

    def __init__(self, name: str, store: Store) -> None:
        self.name, self.store = name, store

    async def assistant(
        self, tenant: str, assistant_id: str | None = None, config: dict[str, Any] | None = None
    ) -> str:
        """A new assistant of ``tenant``; its id."""
        raise NotImplementedError

    async def thread(self, tenant: str) -> str:
        """A new idle thread of ``tenant``; its id."""
        raise NotImplementedError

    async def queue(
        self, tenant: str, thread_id: str, assistant_id: str, strategy: str = "enqueue"
    ) -> Queued:
        """Queue a run on an existing thread (pending)."""
        raise NotImplementedError

    async def thread_row(self, tenant: str, thread_id: str) -> dict[str, Any]:
        """The thread's status, values and checkpoint id."""
        raise NotImplementedError

    # --- shared by all backends ---------------------------------------------------------
    async def new_run(self, tenant: str = "t1", thread_id: str | None = None) -> Run:
        """A run queued on ``thread_id`` (else on a new thread, for a new assistant)."""
        if thread_id is None:
            thread_id = await self.thread(tenant)
        queued = await self.queue(tenant, thread_id, await self.assistant(tenant))
        return queued.run

    async def claim(self, run: Run) -> ClaimedRun:
        """Claim ``run``, which must be claimable."""
        claimed = await self.store.runs.claim(run["run_id"], "contract-worker")
        assert claimed is not None, f"{run['run_id']} was not claimable on {self.name}"
        return claimed

    async def end(
        self, run: Run, status: str = "success", thread_status: str = "idle", **changes: Any
    ) -> tuple[StepWrite, str | None]:
        """Write the end of ``run`` (a :func:`step` with ``changes``, with its lease token);
        the write, and what it returned."""
        write = step(run, end=(status, None, thread_status), **changes)
        return write, await self.store.steps.write(write)


def step(run: Run, n: int = 1, **changes: Any) -> StepWrite:
    """A step of ``run`` (with its lease token) with values and two events."""
    write = StepWrite(
        run["tenant_id"],
        run["run_id"],
        run["thread_id"],
        orjson.Fragment(orjson.dumps({"step": n})),
        values={"messages": [{"type": "human", "content": f"step {n}", "id": str(n)}]},
        step=n,
        next_nodes=["agent"],
        events=[(2 * n, "values", {"n": n}), (2 * n + 1, "updates", {"n": n})],
        lease_token=run.get("lease_token", 0),
    )
    for key, value in changes.items():
        setattr(write, key, value)
    return write


class MemoryBackend(Backend):
    """:class:`MemoryStore`: one process, as SQLite."""

    def __init__(self) -> None:
        self.memory = MemoryStore()
        super().__init__("memory", self.memory)

    async def assistant(
        self, tenant: str, assistant_id: str | None = None, config: dict[str, Any] | None = None
    ) -> str:
        return self.memory.add_assistant(tenant, assistant_id, config=config)["assistant_id"]

    async def thread(self, tenant: str) -> str:
        return self.memory.add_thread(tenant)

    async def queue(
        self, tenant: str, thread_id: str, assistant_id: str, strategy: str = "enqueue"
    ) -> Queued:
        queued = self.memory.queue_run(
            tenant, thread_id, assistant_id, kwargs={"input": None}, multitask_strategy=strategy
        )
        assert queued is not None
        return queued

    async def thread_row(self, tenant: str, thread_id: str) -> dict[str, Any]:
        thread = self.memory.thread(tenant, thread_id)
        assert thread is not None
        return {
            "status": thread.status,
            "values": thread.values,
            "checkpoint_id": thread.checkpoint_id,
        }


class SqlBackend(Backend):
    """A :class:`Database` (SQLite or PostgreSQL), seeded through its stores."""

    def __init__(self, name: str, db: Database) -> None:
        super().__init__(name, db)
        self.db = db
        self.leases = db.queue is not None
        # SQLite's step writes do not set others_waiting (its scheduler has no use for it)
        self.tells_others_waiting = db.queue is not None

    async def assistant(
        self, tenant: str, assistant_id: str | None = None, config: dict[str, Any] | None = None
    ) -> str:
        made, created = await self.db.assistants.create(
            tenant,
            assistant_id=assistant_id,
            graph_id="agent",
            name="a",
            description=None,
            config=config or {},
            context={},
            metadata={},
        )
        assert created
        return str(made["assistant_id"])

    async def thread(self, tenant: str) -> str:
        made, _ = await self.db.threads.create(tenant, thread_id=None, metadata={})
        return str(made["thread_id"])

    async def queue(
        self, tenant: str, thread_id: str, assistant_id: str, strategy: str = "enqueue"
    ) -> Queued:
        queued = await self.db.runs.create(
            tenant,
            thread_id=thread_id,
            assistant_id=assistant_id,
            kwargs={"input": None},
            metadata={},
            multitask_strategy=strategy,
        )
        assert queued is not None
        return queued

    async def thread_row(self, tenant: str, thread_id: str) -> dict[str, Any]:
        thread = await self.db.threads.get(tenant, thread_id)
        assert thread is not None
        return {k: thread[k] for k in ("status", "values", "checkpoint_id")}


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """The database of a contract test (None: the store in memory). A fixture apart from
    :func:`store`: a fresh PostgreSQL database is made outside the test's event loop."""
    if request.param == "memory":
        return None
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nimbus.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(store_url: str | None) -> AsyncIterator[Backend]:
    """Each contract test runs on the store in memory, on SQLite and on PostgreSQL."""
    if store_url is None:
        yield MemoryBackend()
        return
    db = await Database.open(store_url)
    try:
        yield SqlBackend(db.engine.dialect.name, db)
    finally:
        await db.close()
