"""A run's ``durability`` (LangGraph's run option): when its steps are written.

``sync`` writes each step before the next starts, ``exit`` writes nothing before the run's
end, and ``async`` (the default) writes a step while the next one runs. Whatever the mode, a
step that asks for a tool that is not idempotent is written before the tool runs. Each is
checked on a live server, by reading the thread's history while a later call is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from langgraph_sdk import get_client
from langgraph_sdk.schema import Durability

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.cluster import agent, until
from tests.server.conftest import ADMIN_KEY, LiveServer, live_server

CALC_ARGS = '{"expression": "6 * 7"}'
INPUT = {"messages": [{"role": "user", "content": "6*7"}]}


@contextlib.asynccontextmanager
async def _serving(
    database_url: str, tmp: Path, tool_arguments: str, latency: float, **env: str
) -> AsyncIterator[tuple[FakeOpenAIServer, LiveServer]]:
    async with (
        FakeOpenAIServer(tool_arguments=tool_arguments, latency=latency) as fake,
        live_server(database_url, fake, tmp, **env) as server,
    ):
        yield fake, server


async def _start(server: LiveServer, tool: str, durability: Durability | None) -> tuple[str, str]:
    client = get_client(url=server.url, api_key=ADMIN_KEY)
    assistant = await client.assistants.create(graph_id="agent", config=agent(tool))
    thread = await client.threads.create()
    run = await client.runs.create(
        thread["thread_id"], assistant["assistant_id"], input=INPUT, durability=durability
    )
    return thread["thread_id"], run["run_id"]


async def _steps_written(server: LiveServer, thread_id: str, run_id: str) -> list[int]:
    """The steps of ``run_id`` in its thread's history, oldest first."""
    client = get_client(url=server.url, api_key=ADMIN_KEY)
    history = await client.threads.get_history(thread_id, limit=100)
    return sorted(h["metadata"]["step"] for h in history if h["metadata"]["run_id"] == run_id)


async def _finished(server: LiveServer, thread_id: str, run_id: str) -> dict[str, Any]:
    client = get_client(url=server.url, api_key=ADMIN_KEY)
    values = await client.runs.join(thread_id, run_id)
    assert isinstance(values, dict)
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "tool", "ai"]
    assert values["messages"][-1]["content"] == "The result is 42."
    return values


async def test_sync_writes_each_step_before_the_next_starts(
    database_url: str, tmp_path: Path
) -> None:
    async with _serving(database_url, tmp_path, CALC_ARGS, 1.0) as (fake, server):
        thread_id, run_id = await _start(server, "calculator", "sync")
        await until(lambda: fake.request_count == 2)  # model call 2 has just started
        # the step of model call 1 and the tool's step: both written already
        assert await _steps_written(server, thread_id, run_id) == [1, 1]
        await _finished(server, thread_id, run_id)
        assert await _steps_written(server, thread_id, run_id) == [1, 1, 2]


async def test_async_writes_every_step_while_the_next_runs(
    database_url: str, tmp_path: Path
) -> None:
    async with _serving(database_url, tmp_path, CALC_ARGS, 1.0) as (fake, server):
        thread_id, run_id = await _start(server, "calculator", None)  # the default
        await until(lambda: fake.request_count == 2)
        # both steps are written while model call 2 (1 s) is in flight
        deadline = time.monotonic() + 0.8
        while await _steps_written(server, thread_id, run_id) != [1, 1]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        client = get_client(url=server.url, api_key=ADMIN_KEY)
        run = await client.runs.get(thread_id, run_id)
        assert run["status"] == "running"
        assert run["kwargs"]["durability"] == "async"
        await _finished(server, thread_id, run_id)
        assert await _steps_written(server, thread_id, run_id) == [1, 1, 2]


async def test_exit_writes_only_the_run_s_end(database_url: str, tmp_path: Path) -> None:
    async with _serving(database_url, tmp_path, CALC_ARGS, 1.0) as (fake, server):
        thread_id, run_id = await _start(server, "calculator", "exit")
        await until(lambda: fake.request_count == 2)
        assert await _steps_written(server, thread_id, run_id) == []
        await _finished(server, thread_id, run_id)
        assert await _steps_written(server, thread_id, run_id) == [2]
        # the run's events were stored with its end: a late joiner gets them all
        client = get_client(url=server.url, api_key=ADMIN_KEY)
        parts = [p async for p in client.runs.join_stream(thread_id, run_id)]
        assert parts[0].event == "metadata"
        assert [p.event for p in parts].count("values") == 3


async def test_a_step_asking_for_a_tool_that_is_not_idempotent_is_written_first(
    database_url: str, tmp_path: Path
) -> None:
    """Even with ``exit``: after a crash such a tool must be known to have been asked for,
    so that it is not run a second time."""
    tools_log = tmp_path / "tools.log"
    async with _serving(
        database_url,
        tmp_path,
        '{"note": "x"}',
        0.05,
        NIMBUS_TOOL_MODULES='["nimbus.testing.tools"]',
        NIMBUS_TEST_TOOL_LOG=str(tools_log),
        NIMBUS_TEST_TOOL_SLEEP="1",
    ) as (_, server):
        thread_id, run_id = await _start(server, "slow_payment", "exit")
        await until(lambda: tools_log.exists() and "start" in tools_log.read_text())
        assert await _steps_written(server, thread_id, run_id) == [1]  # asks for the tool
        client = get_client(url=server.url, api_key=ADMIN_KEY)
        values = await client.runs.join(thread_id, run_id)
        assert isinstance(values, dict)
        assert values["messages"][2]["content"] == "paid x"


async def test_an_unknown_durability_is_a_422(database_url: str, tmp_path: Path) -> None:
    async with _serving(database_url, tmp_path, "{}", 0.0) as (_, server):
        client = get_client(url=server.url, api_key=ADMIN_KEY)
        assistant = await client.assistants.create(graph_id="agent", config=agent("calculator"))
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.post(
                "/runs/wait",
                headers={"x-api-key": ADMIN_KEY},
                json={
                    "assistant_id": assistant["assistant_id"],
                    "input": INPUT,
                    "durability": "eventually",
                },
            )
    assert r.status_code == 422
    assert "durability" in r.text
