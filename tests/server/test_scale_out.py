"""Scale-out on real processes: API-only replicas and workers sharing one PostgreSQL, and what
happens when a worker is killed, paused past its lease, or the database restarts.

Every process is a real ``nimbus serve --api-only`` or ``nimbus worker`` on loopback; the
model is the fake OpenAI server, which counts and records every call it gets.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph_sdk import get_client

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.postgres import Cluster
from tests.server.cluster import agent, deployment, until
from tests.server.conftest import ADMIN_KEY, LiveServer


@pytest.fixture(params=["notify", "redis"])
def signals(request: pytest.FixtureRequest) -> dict[str, str]:
    """Signals between the processes over PostgreSQL LISTEN/NOTIFY, or over Redis."""
    if request.param == "redis":
        return {"NIMBUS_REDIS_URL": request.getfixturevalue("redis_url")}
    return {}


def _tool_log(tmp: Path) -> list[str]:
    path = tmp / "tools.log"
    return path.read_text().splitlines() if path.exists() else []


async def _start_run(api: LiveServer, config: dict[str, Any]) -> tuple[str, str]:
    """Start a run whose steps are durable before the next starts (``durability="sync"``):
    the tests below count exactly which calls a take-over repeats."""
    client = get_client(url=api.url, api_key=ADMIN_KEY)
    assistant = await client.assistants.create(graph_id="agent", config=config)
    thread = await client.threads.create()
    run = await client.runs.create(
        thread["thread_id"],
        assistant["assistant_id"],
        input={"messages": [{"role": "user", "content": "go"}]},
        durability="sync",
    )
    return thread["thread_id"], run["run_id"]


async def _joined(api: LiveServer, thread_id: str, run_id: str) -> tuple[dict[str, Any], Any]:
    client = get_client(url=api.url, api_key=ADMIN_KEY)
    values = await asyncio.wait_for(client.runs.join(thread_id, run_id), 60)
    return await client.runs.get(thread_id, run_id), values


def _first_calls(fake: FakeOpenAIServer) -> int:
    """Model calls of the run's first step (the shortest conversation: no tool result yet)."""
    sizes = [len(r["messages"]) for r in fake.requests]
    return sizes.count(min(sizes))


async def test_api_replicas_hand_runs_to_workers_and_stream_them(
    postgres_url: str, tmp_path: Path, signals: dict[str, str]
) -> None:
    async with deployment(postgres_url, tmp_path, latency=0.2, env=signals) as d:
        api1, api2 = await d.api(), await d.api()
        w1, w2 = await d.worker(concurrency=3), await d.worker(concurrency=3)
        client1 = get_client(url=api1.url, api_key=ADMIN_KEY)
        client2 = get_client(url=api2.url, api_key=ADMIN_KEY)
        assistant = await client1.assistants.create(graph_id="agent", config=agent("calculator"))

        async def one(i: int) -> dict[str, Any]:
            client = (client1, client2)[i % 2]
            thread = await client.threads.create()
            return await client.runs.wait(  # type: ignore[no-any-return]
                thread["thread_id"],
                assistant["assistant_id"],
                input={"messages": [{"role": "user", "content": f"run {i}"}]},
            )

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(12))), 120)
        assert all(r["messages"][-1]["content"] == "The result is 42." for r in results)
        for worker in (w1, w2):  # both took part (each runs at most 3 at once)
            assert '"event": "run.finished"' in worker.logs(), worker.logs()

        # A stream through one API replica of a run executing on a worker: live, in order.
        thread = await client1.threads.create()
        seen = []
        async for part in client1.runs.stream(
            thread["thread_id"],
            assistant["assistant_id"],
            input={"messages": [{"role": "user", "content": "stream"}]},
            stream_mode=["values", "updates", "messages-tuple"],
        ):
            seen.append(part)
        assert seen[0].event == "metadata"
        assert [p.event for p in seen].count("updates") == 3  # model, tool, model
        assert seen[-1].event == "values" and len(seen[-1].data["messages"]) == 4
        # The same run's stored stream, from the other replica, is the same.
        run_id = seen[0].data["run_id"]
        replay = [
            p
            async for p in client2.runs.join_stream(
                thread["thread_id"], run_id, stream_mode=["values", "updates", "messages-tuple"]
            )
        ]
        assert [(p.event, p.data) for p in replay] == [(p.event, p.data) for p in seen]
        assert "Traceback" not in d.logs()


@pytest.mark.parametrize("moment", ["model call", "right after a step commit"])
async def test_a_killed_worker_s_run_completes_on_another(
    postgres_url: str, tmp_path: Path, moment: str
) -> None:
    async with deployment(postgres_url, tmp_path, latency=1.0) as d:
        api = await d.api()
        await d.worker()
        await d.worker()
        thread_id, run_id = await _start_run(api, agent("calculator"))
        if moment == "model call":  # the first call and the tool are done, the second runs
            await until(lambda: d.fake.request_count == 2)
        else:  # the first model call's step is stored: kill before anything else happens
            deadline = time.monotonic() + 30
            while not (
                await d.sql("SELECT 1 FROM runs WHERE run_id = $1 AND state IS NOT NULL", run_id)
            ):
                assert time.monotonic() < deadline
        victim = await d.holder(run_id)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        run, values = await _joined(api, thread_id, run_id)
    assert run["status"] == "success"
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "tool", "ai"]
    assert len({m["id"] for m in values["messages"]}) == 4  # nothing duplicated
    assert values["messages"][-1]["content"] == "The result is 42."
    assert _first_calls(d.fake) == 1  # the completed first call was not repeated
    assert d.fake.request_count <= 3  # at most the call in flight ran again
    attempts = await d.sql("SELECT attempts FROM runs WHERE run_id = $1", run_id)
    assert attempts[0]["attempts"] == 2


@pytest.mark.parametrize(("tool", "repeated"), [("slow_step", True), ("slow_payment", False)])
async def test_a_worker_killed_during_a_tool_call(
    postgres_url: str, tmp_path: Path, tool: str, repeated: bool
) -> None:
    """An idempotent tool in flight runs again on the next worker; one that is not is not
    repeated: the model is told it may or may not have happened."""
    async with deployment(postgres_url, tmp_path, latency=0.1, tool='{"note": "x"}') as d:
        d.env["NIMBUS_TEST_TOOL_SLEEP"] = "2"
        api = await d.api()
        await d.worker()
        await d.worker()
        thread_id, run_id = await _start_run(api, agent(tool))
        await until(lambda: any(line.startswith("start") for line in _tool_log(tmp_path)))
        victim = await d.holder(run_id)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        run, values = await _joined(api, thread_id, run_id)
    log = _tool_log(tmp_path)
    assert run["status"] == "success"
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "tool", "ai"]
    assert _first_calls(d.fake) == 1
    if repeated:
        assert [line.split()[0] for line in log] == ["start", "start", "end"]
        assert values["messages"][2]["content"] == "done x"
    else:
        assert [line.split()[0] for line in log] == ["start"]  # never ran twice
        assert "interrupted" in values["messages"][2]["content"]


async def test_a_paused_worker_cannot_write_after_its_run_was_taken_over(
    postgres_url: str, tmp_path: Path
) -> None:
    async with deployment(postgres_url, tmp_path, latency=1.5) as d:
        api = await d.api()
        await d.worker()
        await d.worker()
        thread_id, run_id = await _start_run(api, agent("calculator"))
        await until(lambda: d.fake.request_count == 1)  # its first model call is in flight
        stale = await d.holder(run_id)
        stale.process.send_signal(signal.SIGSTOP)
        try:
            # 3 s lease: the other worker sweeps it, claims it and finishes the run
            run, values = await _joined(api, thread_id, run_id)
            assert run["status"] == "success"
        finally:
            stale.process.send_signal(signal.SIGCONT)
        # The stale worker gets its model answer now, and tries to write the step.
        await until(lambda: "run.lease_lost" in stale.logs(), 20)
        await asyncio.sleep(1.0)
        client = get_client(url=api.url, api_key=ADMIN_KEY)
        after = await client.threads.get_state(thread_id)
        history = await client.threads.get_history(thread_id, limit=50)
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "tool", "ai"]
    assert after["values"] == values  # nothing written after the take-over
    steps = [len(h["values"]["messages"]) for h in history]
    assert steps == sorted(steps, reverse=True) and len(steps) == len(set(steps))
    events = await d.sql("SELECT seq FROM run_events WHERE run_id = $1 ORDER BY seq", run_id)
    seqs = [e["seq"] for e in events]
    assert len(seqs) == len(set(seqs))
    assert all(seq >= 1 << 20 for seq in seqs)  # all of the second attempt: the first stored none


async def test_cancel_and_interrupt_reach_the_worker_from_any_replica(
    postgres_url: str, tmp_path: Path, signals: dict[str, str]
) -> None:
    async with deployment(postgres_url, tmp_path, latency=30, env=signals) as d:
        api1, api2 = await d.api(), await d.api()
        await d.worker()
        thread_id, run_id = await _start_run(api1, agent("calculator"))
        await until(lambda: d.fake.request_count == 1)
        client2 = get_client(url=api2.url, api_key=ADMIN_KEY)
        started = time.monotonic()
        await client2.runs.cancel(thread_id, run_id, wait=True)
        assert time.monotonic() - started < 10  # not the 30 s model call
        assert (await client2.runs.get(thread_id, run_id))["status"] == "interrupted"
        assert (await client2.threads.get(thread_id))["status"] == "interrupted"

        # interrupt: a new run on the thread stops the running one, from another replica
        d.fake.latency = 0.2
        client1 = get_client(url=api1.url, api_key=ADMIN_KEY)
        assistant = (await client1.assistants.search())[0]
        d.fake.latency = 30
        first = await client1.runs.create(
            thread_id,
            assistant["assistant_id"],
            input={"messages": [{"role": "user", "content": "slow"}]},
        )
        await until(lambda: d.fake.request_count == 2)
        d.fake.latency = 0.2
        second = await client2.runs.create(
            thread_id,
            assistant["assistant_id"],
            input={"messages": [{"role": "user", "content": "fast"}]},
            multitask_strategy="interrupt",
        )
        await asyncio.wait_for(client2.runs.join(thread_id, second["run_id"]), 30)
        assert (await client2.runs.get(thread_id, first["run_id"]))["status"] == "interrupted"
        assert (await client2.runs.get(thread_id, second["run_id"]))["status"] == "success"


async def test_one_idempotency_key_on_two_replicas_makes_one_run(
    postgres_url: str, tmp_path: Path
) -> None:
    async with deployment(postgres_url, tmp_path, latency=0.1) as d:
        apis = [await d.api(), await d.api()]
        await d.worker()
        client = get_client(url=apis[0].url, api_key=ADMIN_KEY)
        assistant = await client.assistants.create(graph_id="agent", config=agent("calculator"))
        thread = await client.threads.create()
        body = {
            "assistant_id": assistant["assistant_id"],
            "input": {"messages": [{"role": "user", "content": "once"}]},
            "multitask_strategy": "enqueue",
        }
        headers = {"x-api-key": ADMIN_KEY, "Idempotency-Key": "order-7"}
        async with httpx.AsyncClient(timeout=30) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        f"{apis[i % 2].url}/threads/{thread['thread_id']}/runs",
                        json=body,
                        headers=headers,
                    )
                    for i in range(8)
                )
            )
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert len({a.json()["run_id"] for a in answers}) == 1
        runs = await client.runs.list(thread["thread_id"])
        assert len(runs) == 1


async def test_a_stream_resumes_on_another_replica_without_gaps_or_duplicates(
    postgres_url: str, tmp_path: Path, signals: dict[str, str]
) -> None:
    async with deployment(postgres_url, tmp_path, latency=0.5, env=signals) as d:
        api1, api2 = await d.api(), await d.api()
        await d.worker()
        client = get_client(url=api1.url, api_key=ADMIN_KEY)
        assistant = await client.assistants.create(graph_id="agent", config=agent("calculator"))
        thread = await client.threads.create()
        body = {
            "assistant_id": assistant["assistant_id"],
            "input": {"messages": [{"role": "user", "content": "resume me"}]},
            "stream_mode": ["values", "messages-tuple", "updates"],
            "stream_resumable": True,
        }
        headers = {"x-api-key": ADMIN_KEY}
        first: list[tuple[int, str, Any]] = []
        async with (
            httpx.AsyncClient(timeout=30) as http,
            http.stream(
                "POST",
                f"{api1.url}/threads/{thread['thread_id']}/runs/stream",
                json=body,
                headers=headers,
            ) as response,
        ):
            location = response.headers["Location"]
            async for frame in _frames(response):
                first.append(frame)
                if len(first) == 4:
                    break  # the connection drops mid-run
        last_id = first[-1][0]
        rest: list[tuple[int, str, Any]] = []
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream(
                "GET", f"{api2.url}{location}", headers={**headers, "Last-Event-ID": str(last_id)}
            ) as response,
        ):
            async for frame in _frames(response):
                rest.append(frame)
        run_id = first[0][2]["run_id"]
        stored = await d.sql(
            "SELECT seq, event FROM run_events WHERE run_id = $1 ORDER BY seq", run_id
        )
    got = [seq for seq, _, _ in first + rest]
    assert got == sorted(set(got))  # in order, each once
    assert got == [r["seq"] for r in stored]  # and none missing
    assert rest[-1][1] == "values" and len(rest[-1][2]["messages"]) == 4


async def _frames(response: httpx.Response) -> AsyncIterator[tuple[int, str, Any]]:
    event, data, seq = None, None, None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line.startswith("id: "):
            seq = int(line[4:])
        elif line == "" and event is not None and seq is not None:
            yield seq, event, data
            event, data, seq = None, None, None


async def test_no_accepted_run_is_lost_when_postgres_restarts(tmp_path: Path) -> None:
    """Runs accepted (2xx) before and during a PostgreSQL restart all complete; requests made
    while it is down get 503, never 500."""
    cluster = Cluster()
    try:
        cluster.start()
        async with deployment(cluster.url, tmp_path, latency=0.3) as d:
            api = await d.api()
            await d.worker(concurrency=16)
            await d.worker(concurrency=16)
            client = get_client(url=api.url, api_key=ADMIN_KEY)
            assistant = await client.assistants.create(graph_id="agent", config=agent("calculator"))
            accepted: list[tuple[str, str]] = []
            statuses: list[int] = []

            async def submit(http: httpx.AsyncClient, i: int) -> None:
                r = await http.post(
                    "/runs",
                    json={
                        "assistant_id": assistant["assistant_id"],
                        "input": {"messages": [{"role": "user", "content": f"r{i}"}]},
                        "on_completion": "keep",
                    },
                )
                statuses.append(r.status_code)
                if r.status_code == 200:
                    accepted.append((r.json()["thread_id"], r.json()["run_id"]))

            async with httpx.AsyncClient(
                base_url=api.url, headers={"x-api-key": ADMIN_KEY}, timeout=30
            ) as http:
                for i in range(20):
                    await submit(http, i)
                cluster.stop()  # mid-load: runs are executing and waiting
                for i in range(20, 25):
                    await submit(http, i)
                await asyncio.sleep(2)
                cluster.start()
                deadline = time.monotonic() + 30
                while (await http.get("/ok")).status_code != 200:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
                for i in range(25, 30):
                    await submit(http, i)
                deadline = time.monotonic() + 90
                while True:
                    rows = await d.sql("SELECT status, count(*) AS n FROM runs GROUP BY status")
                    counts = {r["status"]: r["n"] for r in rows}
                    if counts.get("pending", 0) + counts.get("running", 0) == 0:
                        break
                    assert time.monotonic() < deadline, counts
                    await asyncio.sleep(0.5)
            assert set(statuses) <= {200, 503}, statuses
            assert len(accepted) >= 25  # all but those sent while it was down
            done = await d.sql(
                "SELECT run_id, status FROM runs WHERE run_id = ANY($1::text[])",
                [run_id for _, run_id in accepted],
            )
            assert sorted(r["status"] for r in done) == ["success"] * len(accepted)
            assert "Traceback" not in d.logs()
    finally:
        cluster.remove()


def test_worker_and_api_only_refuse_sqlite(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "NIMBUS_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    for command in (["worker"], ["serve", "--api-only"]):
        done = subprocess.run(
            [sys.executable, "-m", "nimbus", *command, "--port", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "PostgreSQL" in done.stderr and "Traceback" not in done.stderr


async def test_a_stopping_worker_hands_its_runs_back_at_once(
    postgres_url: str, tmp_path: Path
) -> None:
    """SIGTERM: the worker stops claiming, gives its runs the grace period, then hands them
    back: another worker resumes them at once, not a lease time later."""
    async with deployment(postgres_url, tmp_path, latency=6.0) as d:
        d.env.update(NIMBUS_LEASE_TTL_S="60", NIMBUS_SHUTDOWN_GRACE_S="1")
        api = await d.api()
        await d.worker()
        thread_id, run_id = await _start_run(api, agent("calculator"))
        await until(lambda: d.fake.request_count == 1)
        leaving = await d.holder(run_id)
        await d.worker()  # the one that takes over
        stopped = time.monotonic()
        leaving.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(leaving.process.wait, 30)
        assert code == 0, leaving.logs()
        assert time.monotonic() - stopped < 10
        assert '"event": "worker.handed_back"' in leaving.logs()
        run, values = await _joined(api, thread_id, run_id)
        # three model calls of 6 s after the hand-back at most, far from the 60 s lease
        assert time.monotonic() - stopped < 45
    assert run["status"] == "success"
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "tool", "ai"]
    attempts = await d.sql(
        "SELECT attempt, worker FROM run_attempts WHERE run_id = $1 ORDER BY attempt", run_id
    )
    assert len(attempts) == 2 and attempts[0]["worker"] != attempts[1]["worker"]
