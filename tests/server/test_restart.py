"""A server that dies or stops mid-run loses nothing: runs resume from their last step."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from langgraph_sdk import get_client
from langgraph_sdk.schema import Durability

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import ADMIN_KEY, live_server

CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}


async def until(condition: Callable[[], bool], limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("durability", ["sync", "async"])
async def test_killed_server_resumes_run_without_repeating_completed_calls(
    database_url: str, tmp_path: Path, durability: Durability
) -> None:
    async with FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}', latency=1.0) as fake:
        async with live_server(database_url, fake, tmp_path) as first:
            client = get_client(url=first.url, api_key=ADMIN_KEY)
            assistant = await client.assistants.create(graph_id="agent", config=CALC)
            thread = await client.threads.create()
            run = await client.runs.create(
                thread["thread_id"],
                assistant["assistant_id"],
                input={"messages": [{"role": "user", "content": "6*7"}]},
                durability=durability,
            )
            # The first model call and the tool are done; the second model call is in flight.
            await until(lambda: fake.request_count == 2)
            first.process.send_signal(signal.SIGKILL)
            first.process.wait()
        async with live_server(database_url, fake, tmp_path) as second:
            client = get_client(url=second.url, api_key=ADMIN_KEY)
            values = await client.runs.join(thread["thread_id"], run["run_id"])
            finished = await client.runs.get(thread["thread_id"], run["run_id"])
    assert finished["status"] == "success"
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "tool", "ai"]
    assert len({m["id"] for m in values["messages"]}) == 4  # nothing duplicated
    assert values["messages"][-1]["content"] == "The result is 42."
    if durability == "sync":
        # Call 1 (completed) was not repeated; call 2 (in flight when killed) ran again.
        assert fake.request_count == 3
        assert len(fake.requests[2]["messages"]) == len(fake.requests[1]["messages"])
    else:
        # The step before the call in flight may not have been written yet: its calls
        # (model call 1 and the tool) may run again, nothing earlier.
        assert fake.request_count in (3, 4)
        assert len(fake.requests[-1]["messages"]) == len(fake.requests[1]["messages"])


async def test_sigterm_lets_the_running_step_finish(database_url: str, tmp_path: Path) -> None:
    async with FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}', latency=0.5) as fake:
        async with live_server(database_url, fake, tmp_path) as server:
            client = get_client(url=server.url, api_key=ADMIN_KEY)
            assistant = await client.assistants.create(graph_id="agent", config=CALC)
            thread = await client.threads.create()
            run = await client.runs.create(
                thread["thread_id"],
                assistant["assistant_id"],
                input={"messages": [{"role": "user", "content": "6*7"}]},
            )
            await until(lambda: fake.request_count == 1)
            server.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.process.wait, 30)
            assert code == 0, server.logs()
        async with live_server(database_url, fake, tmp_path) as again:
            client = get_client(url=again.url, api_key=ADMIN_KEY)
            values = await client.runs.join(thread["thread_id"], run["run_id"])
    assert values["messages"][-1]["content"] == "The result is 42."
    assert fake.request_count == 2  # nothing ran twice
