"""Every run ends, whatever raises: a fault injected at each stage of a run's execution (in
process, on SQLite and PostgreSQL) ends the run ``error`` with a reason, and its thread is
not left busy: the next run on it succeeds.

Before, a run whose model id could not be built (``openai:``) failed at start, writing its end
failed too (``RunExecution`` had no ``state``), and the run stayed ``running`` and its thread
``busy`` for ever (409 for every new run, a restart doing the same).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from nimbus.adapters.llm import ModelCatalog
from nimbus.adapters.llm.openai import OpenAIModel
from nimbus.adapters.store.database import Database
from nimbus.adapters.store.writer import StepWriter
from nimbus.adapters.tools.builtin import builtin_tools
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.executor import RunCheckpoints, RunExecution
from nimbus.service.pool import worker_pool
from nimbus.service.workers import Workers
from nimbus.settings import Settings
from nimbus.testing.fake_openai import FakeOpenAIServer

TENANT = "t1"
# the fake endpoint asks for one calculator call, then answers: a step to write, a tool to run
CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}


@dataclass
class Harness:
    db: Database
    pool: Workers

    async def assistant(self, config: dict[str, Any] = CALC) -> str:
        row, _ = await self.db.assistants.create(
            TENANT,
            assistant_id=None,
            graph_id="agent",
            name="a",
            description=None,
            config=config,
            context={},
            metadata={},
            if_exists="raise",
        )
        return str(row["assistant_id"])

    async def run(self, assistant_id: str, thread_id: str) -> dict[str, Any]:
        """Queue a run, let the pool execute it, and return its row once it is over."""
        queued = await self.db.runs.create(
            TENANT,
            thread_id=thread_id,
            assistant_id=assistant_id,
            kwargs={
                "input": {"messages": [{"role": "user", "content": "hi"}]},
                "stream_mode": ["values"],
                "durability": "sync",
            },
            metadata={},
            multitask_strategy="reject",
        )
        assert queued is not None
        run = queued.run
        self.pool.submit(queued)
        async with asyncio.timeout(30):
            while True:
                row = await self.db.runs.get(TENANT, run["run_id"])
                assert row is not None
                if row["status"] not in ("pending", "running") and (row["lease_owner"] is None):
                    return row
                await asyncio.sleep(0.02)


@pytest.fixture
async def harness(database_url: str, fake_openai: FakeOpenAIServer) -> AsyncIterator[Harness]:
    settings = Settings(
        database_url=database_url,
        openai_base_url=fake_openai.base_url,
        model_max_retries=0,
        poll_s=0.05,
        lease_ttl_s=3,
    )
    db = await Database.open(database_url)
    pool = worker_pool(
        db,
        RunBroker(),
        AgentFactory(
            ModelCatalog(settings),
            builtin_tools(settings),
            max_thread_bytes=settings.max_thread_bytes,
        ),
        8,
        lease_s=3,
        poll_s=0.05,
    )
    await pool.start()
    try:
        yield Harness(db, pool)
    finally:
        await pool.stop(1)
        await db.close()


def _raise(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected fault")


async def _raise_async(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected fault")


def _fail_step_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step write fails (its future raises); the run's end is still written."""
    original = StepWriter.submit

    def submit(self: StepWriter, step: Any) -> Any:
        if step.end is not None:
            return original(self, step)
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("injected write fault"))
        return failed

    monkeypatch.setattr(StepWriter, "submit", submit)


def _fail_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor cannot write the run's end (with its state and events) at all: the
    worker writes the end alone, the last resort."""
    monkeypatch.setattr(RunExecution, "finish", _raise_async)


STAGES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "building the agent": lambda mp: mp.setattr("nimbus.service.executor.build_agent", _raise),
    "resolving the model": lambda mp: mp.setattr(AgentFactory, "model", _raise),
    "resolving the tools": lambda mp: mp.setattr(AgentFactory, "tools_for", _raise),
    "calling the model": lambda mp: mp.setattr(OpenAIModel, "request", _raise_async),
    "emitting an event": lambda mp: mp.setattr(RunExecution, "on_event", _raise),
    "saving a step": lambda mp: mp.setattr(RunCheckpoints, "save", _raise_async),
    "writing a step": _fail_step_writes,
    "writing the end": _fail_ends,
}


@pytest.mark.parametrize("stage", list(STAGES))
async def test_a_run_ends_whatever_raises(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    assistant_id = await harness.assistant()
    thread, _ = await harness.db.threads.create(TENANT, thread_id=None, metadata={})
    with monkeypatch.context() as faults:
        STAGES[stage](faults)
        ended = await harness.run(assistant_id, thread["thread_id"])
    assert ended["status"] == "error", (stage, ended)
    assert "internal error" in ended["error"], ended["error"]
    if stage != "writing the end":  # the end written alone carries no events
        events = await harness.db.runs.events(ended["run_id"])
        assert [d["error"] for _, name, d in events if name == "error"] == ["internal_error"]
    stored = await harness.db.threads.get(TENANT, thread["thread_id"])
    assert stored is not None and stored["status"] == "error", stored
    # the thread is not stuck: the next run on it goes through
    again = await harness.run(assistant_id, thread["thread_id"])
    assert again["status"] == "success", again


async def test_a_stored_model_id_that_cannot_be_built_ends_the_run(harness: Harness) -> None:
    """An assistant stored before model ids were checked fully (``openai:``): its runs end
    with the reason, they do not hang."""
    assistant_id = await harness.assistant({"configurable": {"model": "test:echo"}})
    async with harness.db.engine.begin() as conn:
        from sqlalchemy import update

        from nimbus.adapters.store.schema import assistants

        await conn.execute(
            update(assistants)
            .where(assistants.c.assistant_id == assistant_id)
            .values(config={"configurable": {"model": "openai:", "max_steps": 10**6}})
        )
    thread, _ = await harness.db.threads.create(TENANT, thread_id=None, metadata={})
    ended = await harness.run(assistant_id, thread["thread_id"])
    assert ended["status"] == "error"
    assert "invalid assistant settings" in ended["error"] or "provider:name" in ended["error"]
    stored = await harness.db.threads.get(TENANT, thread["thread_id"])
    assert stored is not None and stored["status"] == "error"
