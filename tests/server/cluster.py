"""Several Nimbus processes on one database, for scale-out tests: API-only replicas and
workers started and stopped by the test, a fake model, and the tools of
``nimbus.testing.tools`` (which log every call)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import LiveServer, live_server

TOOLS_ENV = {"NIMBUS_TOOL_MODULES": '["nimbus.testing.tools"]'}


def agent(tool: str) -> dict[str, Any]:
    return {"configurable": {"model": "openai:fake-model", "tools": [tool]}}


async def until(condition: Callable[[], Any], limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@dataclass
class Deployment:
    """API replicas and workers on one database, started and stopped by the test."""

    database_url: str
    fake: FakeOpenAIServer
    tmp: Path
    env: dict[str, str]
    stack: contextlib.AsyncExitStack
    apis: list[LiveServer] = field(default_factory=list)
    workers: list[LiveServer] = field(default_factory=list)

    async def api(self) -> LiveServer:
        server = await self.stack.enter_async_context(
            live_server(self.database_url, self.fake, self.tmp, ("serve", "--api-only"), **self.env)
        )
        self.apis.append(server)
        return server

    async def worker(self, concurrency: int = 8) -> LiveServer:
        command = ("worker", "--concurrency", str(concurrency))
        server = await self.stack.enter_async_context(
            live_server(self.database_url, self.fake, self.tmp, command, **self.env)
        )
        self.workers.append(server)
        return server

    async def holder(self, run_id: str) -> LiveServer:
        """The worker process holding ``run_id``'s lease now."""
        conn = await asyncpg.connect(self.database_url)
        try:
            owner = await conn.fetchval("SELECT lease_owner FROM runs WHERE run_id = $1", run_id)
        finally:
            await conn.close()
        assert owner, f"nobody holds run {run_id}"
        pid = int(owner.split(":")[1])
        return next(w for w in self.workers if w.process.pid == pid)

    async def sql(self, query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    def logs(self) -> str:
        return "\n".join(s.logs() for s in [*self.apis, *self.workers])


@contextlib.asynccontextmanager
async def deployment(
    database_url: str,
    tmp: Path,
    latency: float = 0.0,
    tool: str = '{"expression": "6 * 7"}',
    env: dict[str, str] | None = None,
) -> AsyncIterator[Deployment]:
    env = {**TOOLS_ENV, "NIMBUS_TEST_TOOL_LOG": str(tmp / "tools.log"), **(env or {})}
    async with contextlib.AsyncExitStack() as stack:
        fake = await stack.enter_async_context(
            FakeOpenAIServer(tool_arguments=tool, latency=latency)
        )
        yield Deployment(database_url, fake, tmp, env, stack)
