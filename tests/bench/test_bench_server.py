"""``nimbus bench server`` with tiny settings: the figures are there and every run was right.

Behaviour only, never speed: speed figures come from running the benchmark itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import orjson

from nimbus.bench.processes import NimbusServer, nimbus_server
from nimbus.bench.server import (
    EXPECTED_ANSWER,
    TOOL_ARGUMENTS,
    CellResult,
    Floor,
    LoadClient,
    Placement,
    bench_server,
    check_stream,
    default_placement,
    measure_floor,
)
from nimbus.testing.fake_openai import FakeOpenAIServer


def test_tiny_sqlite_bench_runs_every_cell_without_errors() -> None:
    seen: list[CellResult] = []
    floors: list[Floor] = []
    results = bench_server(
        runs=5,
        concurrencies=[1, 2],
        latency_ms=0,
        modes=["stream", "wait"],
        databases=["sqlite"],
        turns=2,
        report=seen.append,
        on_floor=floors.append,
    )
    assert seen == results
    assert len(floors) == 1 and floors[0].runs > 0
    assert 0 <= floors[0].added_p50_ms <= floors[0].added_p99_ms
    cells = {(r.database, r.mode, r.concurrency) for r in results}
    assert cells == {("sqlite", m, c) for m in ("stream", "wait") for c in (1, 2)}
    for r in results:
        assert (r.runs, r.errors, r.error_kinds) == (5, 0, {}), r
        assert r.runs_per_s > 0 and r.p50_ms <= r.p99_ms
        assert r.server_cpu_ms_per_run >= 0 and r.db_cpu_ms_per_run is None


def _sse(*events: tuple[str, object]) -> bytes:
    return b"".join(
        b"event: %s\ndata: %s\nid: %d\n\n" % (name.encode(), orjson.dumps(data), i)
        for i, (name, data) in enumerate(events)
    )


def test_check_stream_accepts_a_good_run_and_names_what_is_wrong() -> None:
    final = {
        "messages": [{"type": "human", "content": "q"}, {"type": "ai", "content": EXPECTED_ANSWER}]
    }
    metadata = ("metadata", {"run_id": "r"})
    assert check_stream(_sse(metadata, ("values", {"messages": []}), ("values", final))) is None
    failed = check_stream(_sse(metadata, ("error", {"error": "RunError", "message": "boom"})))
    assert failed is not None and "boom" in failed
    assert "metadata" in (check_stream(_sse(("values", final))) or "")
    assert "no values" in (check_stream(_sse(metadata)) or "")
    wrong = {"messages": [{"type": "ai", "content": "nope"}]}
    assert "'nope'" in (check_stream(_sse(metadata, ("values", wrong))) or "")


def test_default_placement_keeps_the_server_alone_on_its_core() -> None:
    assert default_placement([0]) == Placement(None, None, None)
    assert default_placement([0, 1]) == Placement(0, 1, 1)
    assert default_placement([2, 5, 7, 9]) == Placement(2, 5, 7)


@contextlib.asynccontextmanager
async def _served(tmp_path: Path) -> AsyncIterator[tuple[FakeOpenAIServer, NimbusServer]]:
    """A fake model and the bench's ``nimbus serve`` on SQLite, talking to it."""
    fake = await FakeOpenAIServer(tool_arguments=TOOL_ARGUMENTS).start()
    try:
        loop = asyncio.get_running_loop()
        started = nimbus_server(f"sqlite:///{tmp_path}/n.db", fake.base_url, None, tmp_path)
        server = await loop.run_in_executor(None, started.__enter__)
        try:
            yield fake, server
        finally:
            await loop.run_in_executor(None, started.__exit__, None, None, None)
    finally:
        await fake.stop()


async def test_the_floor_sends_the_requests_the_server_sends(tmp_path: Path) -> None:
    async with _served(tmp_path) as (fake, server):
        client = LoadClient(server, 1)
        await client.create_assistant()
        assert await client.run("stream", await client.create_thread()) is None
        await client.close()
        by_server = list(fake.requests)
        assert len(by_server) == 2
        fake.requests.clear()
        await measure_floor(fake.base_url, 0, runs=1)
        assert fake.requests[:2] == by_server  # the same two requests, body for body


async def test_runs_may_name_the_assistant_by_its_graph(tmp_path: Path) -> None:
    async with _served(tmp_path) as (_, server):
        client = LoadClient(server, 1, by_graph=True)
        await client.create_assistant()
        assert client.assistant_id == "agent"
        thread_id = await client.create_thread()
        assert await client.run("stream", thread_id) is None
        assert await client.run("wait", thread_id) is None
        assistants = await client._post("/assistants/search", {})
        async with client.session.get(
            f"{client.base}/threads/{thread_id}/runs", headers=client.headers
        ) as r:
            runs = orjson.loads(await r.read())
        await client.close()
    # both runs ran with the one assistant the bench made, named by its graph
    assert len(assistants) == 1
    assert [(r["assistant_id"], r["status"]) for r in runs] == [
        (assistants[0]["assistant_id"], "success")
    ] * 2
