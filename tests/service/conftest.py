"""The service in one process, without a server: a scheduler on a :class:`MemoryStore` whose
runs call a gated model, so that each test decides when each run's model call answers.

A run is named by the text of its input message; the model's call for it waits until the
test releases that name (:meth:`Script.release`), then answers ``answer to <name>`` (or
raises, for names in :attr:`Script.failing`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from nimbus.adapters.llm.test import FunctionModel
from nimbus.adapters.store.memory import MemoryStore
from nimbus.core.messages import AssistantMessage, Message, UserMessage
from nimbus.core.model import Model, ModelResponse, ModelSettings, ToolSpec
from nimbus.core.tool import ToolRegistry
from nimbus.exceptions import ConfigError
from nimbus.records import Outcome, Queued
from nimbus.service.agents import AgentFactory
from nimbus.service.broker import RunBroker
from nimbus.service.pool import worker_pool
from nimbus.service.workers import Completion, Workers

MODEL_ID = "test:gated"
WAIT_S = 5.0  #: the longest a test waits for anything: a hang fails, and says where


def _name(messages: Sequence[Message]) -> str:
    """The run a model call is for: the text of the last user message."""
    return next(m.content for m in reversed(messages) if isinstance(m, UserMessage))


class Script:
    """What the gated model does, by run name, and what it saw."""

    def __init__(self) -> None:
        self.started: list[str] = []  #: the names of the model calls, in the order they came
        self.seen: dict[str, list[Message]] = {}  #: each name's conversation (its last call)
        self.failing: set[str] = set()  #: names whose call raises
        self.running = 0  #: model calls waiting on their gate now
        self.most_running = 0
        self._gates: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Condition()

    def release(self, *names: str) -> None:
        """Let the calls for ``names`` answer (now, or as soon as they come)."""
        for name in names:
            self._gate(name).set()

    async def wait_started(self, count: int) -> list[str]:
        """Until ``count`` model calls have come; the names so far."""
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: len(self.started) >= count)
        return list(self.started)

    async def call(self, messages: Sequence[Message]) -> str:
        """A model call comes: record it, wait for its gate; its name."""
        name = _name(messages)
        async with self._changed:
            self.started.append(name)
            self.seen[name] = list(messages)
            self._changed.notify_all()
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self._gate(name).wait()
        finally:
            self.running -= 1
        if name in self.failing:
            raise RuntimeError(f"the model broke on {name}")
        return name

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())


class GatedModel(FunctionModel):
    """A :class:`FunctionModel` whose calls wait on the :class:`Script`'s gates."""

    def __init__(self, script: Script) -> None:
        super().__init__(lambda messages, _: AssistantMessage(f"answer to {_name(messages)}"))
        self.model_id = MODEL_ID
        self.script = script

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> ModelResponse:
        await self.script.call(messages)
        return await super().request(messages, tools, settings)


class ScriptedCatalog:
    """A :class:`nimbus.ports.ModelCatalog` of one model: the gated one."""

    default = MODEL_ID

    def __init__(self, script: Script) -> None:
        self.script = script

    def check(self, model_id: str) -> tuple[str, str]:
        """``(provider, name)`` of the one model id offered."""
        if model_id != MODEL_ID:
            raise ConfigError(f"no model {model_id!r} here; only {MODEL_ID}")
        provider, _, name = model_id.partition(":")
        return provider, name

    def build(self, model_id: str) -> Model:
        """A gated model."""
        self.check(model_id)
        return GatedModel(self.script)


class Harness:
    """A store, a scripted model, and the worker pools of one test."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.script = Script()
        self.broker = RunBroker()
        self.agents = AgentFactory(
            ScriptedCatalog(self.script), ToolRegistry(), max_thread_bytes=1 << 20
        )
        self.pools: list[Workers] = []
        self._assistants: dict[str, str] = {}
        self._done: dict[str, Completion] = {}

    async def pool(self, concurrency: int = 8, tenant_max_running: int | None = None) -> Workers:
        """A started worker pool on the store (resuming what the store holds unfinished)."""
        pool = worker_pool(self.store, self.broker, self.agents, concurrency, tenant_max_running)
        self.pools.append(pool)
        await pool.start()
        for run in await self.store.runs.unfinished():
            self._track(pool, run["run_id"])
        return pool

    def assistant(self, tenant: str) -> str:
        """The tenant's assistant (made on first use)."""
        if tenant not in self._assistants:
            made = self.store.add_assistant(tenant)
            self._assistants[tenant] = made["assistant_id"]
        return self._assistants[tenant]

    def queue(self, tenant: str, name: str, thread_id: str | None = None) -> Queued:
        """Queue a run named ``name`` in the store (on a new thread unless given)."""
        thread_id = thread_id or self.store.add_thread(tenant)
        queued = self.store.queue_run(
            tenant,
            thread_id,
            self.assistant(tenant),
            kwargs={"input": {"messages": [{"role": "user", "content": name}]}},
        )
        assert queued is not None
        return queued

    def submit(self, pool: Workers, tenant: str, name: str, thread_id: str | None = None) -> str:
        """Queue a run as the API does: stored pending, then handed to ``pool``; its id."""
        queued = self.queue(tenant, name, thread_id)
        pool.submit(queued)
        run_id = queued.run["run_id"]
        self._track(pool, run_id)
        return run_id

    def _track(self, pool: Workers, run_id: str) -> None:
        done = pool.done_event(run_id)
        if done is not None:
            self._done[run_id] = done

    async def finished(self, run_id: str) -> Outcome | None:
        """Until the run's attempt in this process is over; how it ended (None: its end was
        not written here)."""
        assert run_id in self._done, f"run {run_id} was never taken by a pool of this test"
        async with asyncio.timeout(WAIT_S):
            await self._done[run_id].wait()
        return self._done[run_id].outcome

    async def status(self, run_id: str) -> tuple[str, int]:
        """The run's status and attempts, as stored."""
        run = await self.store.runs.get_any(run_id)
        assert run is not None
        return run["status"], run["attempts"]

    async def close(self) -> None:
        """Stop every pool (cutting off what still runs) and close the models."""
        for pool in self.pools:
            await pool.stop(grace_s=0)
        await self.agents.aclose()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A store, a scripted model and pools, stopped at the end of the test."""
    made = Harness()
    try:
        yield made
    finally:
        await made.close()
