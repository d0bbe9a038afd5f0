"""Dead and stalled workers on real processes (PostgreSQL): a killed worker's runs resume on
another within seconds, through its liveness lock, with the default 30 s lease; a paused one
keeps its runs until its lease expires; and a database restart hands over no live worker's
runs (the restart guard). See nimbus.adapters.store.liveness."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
from langgraph_sdk import get_client

from nimbus.adapters.store.liveness import RESTART_GRACE_S
from tests.postgres import Cluster
from tests.server.cluster import Deployment, agent, deployment
from tests.server.conftest import ADMIN_KEY, LiveServer

RUNS = 40
_LOCK_FREE = "SELECT pg_try_advisory_xact_lock(hashtextextended('nimbus.worker:' || $1, 0))"


async def _start_runs(api: LiveServer, n: int) -> list[str]:
    """``n`` runs, each on a thread of its own, steps durable before the next starts."""
    client = get_client(url=api.url, api_key=ADMIN_KEY)
    assistant = await client.assistants.create(graph_id="agent", config=agent("calculator"))

    async def one(i: int) -> str:
        thread = await client.threads.create()
        run = await client.runs.create(
            thread["thread_id"],
            assistant["assistant_id"],
            input={"messages": [{"role": "user", "content": f"run {i}"}]},
            durability="sync",
        )
        return str(run["run_id"])

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _in_flight(d: Deployment, run_ids: list[str]) -> tuple[LiveServer, str]:
    """Once every run is running on one worker, its first model call in flight: that
    worker, and its id."""
    deadline = time.monotonic() + 60
    while True:
        rows = await d.sql(
            "SELECT lease_owner, count(*) AS n FROM runs WHERE run_id = ANY($1::text[])"
            " AND status = 'running' GROUP BY lease_owner",
            run_ids,
        )
        if sum(r["n"] for r in rows) == len(run_ids) and d.fake.request_count >= len(run_ids):
            break
        assert time.monotonic() < deadline, "the runs did not all start"
        await asyncio.sleep(0.05)
    assert len(rows) == 1, rows
    return await d.holder(run_ids[0]), rows[0]["lease_owner"]


async def _trusting_sweeper(d: Deployment) -> LiveServer:
    """A second worker, once its sweep trusts free locks: its own has been held for the
    restart guard's grace (a wait on time: the grace is time)."""
    worker = await d.worker(concurrency=64)
    await asyncio.sleep(RESTART_GRACE_S + 1)
    return worker


async def _attempts(d: Deployment, run_ids: list[str]) -> list[Any]:
    return list(
        await d.sql(
            "SELECT run_id, status, attempts FROM runs WHERE run_id = ANY($1::text[])", run_ids
        )
    )


async def _until_done(d: Deployment, run_ids: list[str], limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while any(r["status"] in ("pending", "running") for r in await _attempts(d, run_ids)):
        assert time.monotonic() < deadline, await _attempts(d, run_ids)
        await asyncio.sleep(0.2)


async def test_a_killed_worker_s_runs_resume_within_seconds(
    postgres_url: str, tmp_path: Path
) -> None:
    """SIGKILL with the default 30 s lease: its runs are claimed again about a second later
    (its lock is free at once), not when its lease expires."""
    async with deployment(
        postgres_url, tmp_path, latency=60, env={"NIMBUS_LEASE_TTL_S": "30"}
    ) as d:
        api = await d.api()
        await d.worker(concurrency=64)
        run_ids = await _start_runs(api, RUNS)
        victim, _ = await _in_flight(d, run_ids)
        survivor = await _trusting_sweeper(d)
        d.fake.latency = 0.2  # the calls in flight on the victim stay slow: it dies in them
        conn = await asyncpg.connect(d.database_url)
        try:
            killed = time.monotonic()
            victim.process.send_signal(signal.SIGKILL)
            resumed = finished = None
            while finished is None:
                row = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE attempts >= 2) AS resumed,"
                    " count(*) FILTER (WHERE status = 'success') AS finished"
                    " FROM runs WHERE run_id = ANY($1::text[])",
                    run_ids,
                )
                at = time.monotonic() - killed
                if resumed is None and row["resumed"] == RUNS:
                    resumed = at
                if row["finished"] == RUNS:
                    finished = at
                assert at < 60, (row, survivor.logs())
                await asyncio.sleep(0.02)
        finally:
            await conn.close()
        print(
            f"\nSIGKILL -> {RUNS} runs claimed again: {resumed:.2f} s; finished: {finished:.2f} s"
        )
        assert resumed is not None and resumed < 5  # the lease would have taken 30 s
        attempts = await d.sql(
            "SELECT run_id, count(*) AS n, count(DISTINCT worker) AS workers FROM run_attempts"
            " WHERE run_id = ANY($1::text[]) GROUP BY run_id",
            run_ids,
        )
        assert sorted((r["n"], r["workers"]) for r in attempts) == [(2, 2)] * RUNS
        assert "Traceback" not in survivor.logs()


async def test_a_paused_worker_keeps_its_runs_until_its_lease_expires(
    postgres_url: str, tmp_path: Path
) -> None:
    """SIGSTOP: the worker's connection, and so its lock, stays: no sweep takes its runs
    while its heartbeat lives; the first sweep after it expired does."""
    async with deployment(postgres_url, tmp_path, latency=60, env={"NIMBUS_LEASE_TTL_S": "6"}) as d:
        api = await d.api()
        await d.worker()
        run_ids = await _start_runs(api, 3)
        stalled, owner = await _in_flight(d, run_ids)
        await _trusting_sweeper(d)
        d.fake.latency = 0.2
        conn = await asyncpg.connect(d.database_url)
        stalled.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while True:
                row = await conn.fetchrow(
                    "SELECT extract(epoch FROM expires_at - now()) AS remaining,"
                    " (SELECT count(*) FROM runs WHERE lease_owner = $1) AS held"
                    " FROM workers WHERE worker_id = $1",
                    owner,
                )
                assert not await conn.fetchval(_LOCK_FREE, owner)  # its lock is held throughout
                remaining = float(row["remaining"])
                if row["held"] < len(run_ids):
                    break
                assert remaining > -2, "not swept after its lease expired"
                await asyncio.sleep(0.02)
        finally:
            stalled.process.send_signal(signal.SIGCONT)
            await conn.close()
        # Swept all at once, never before its lease expired (a few ms for the statements):
        # seconds of sweeps that trust free locks left it alone (6 s of lease, renewed every
        # 2 s: 4 s left at least when it stopped, give or take the load).
        assert row["held"] == 0 and remaining < 0.05, row
        kept_s = time.monotonic() - stopped
        assert kept_s > 2
        print(f"\nswept {-remaining:.2f} s after the paused worker's lease expired, {kept_s:.1f} s")
        await _until_done(d, run_ids)
    assert [(r["status"], r["attempts"]) for r in await _attempts(d, run_ids)] == [
        ("success", 2)
    ] * len(run_ids)


async def test_a_database_restart_hands_over_no_live_worker_s_runs(tmp_path: Path) -> None:
    """After a restart every lock is free until its worker takes it again. A worker paused
    across the restart takes its lock back seconds after the sweeper reconnected; the sweeper
    trusts no free lock meanwhile (the restart guard): the runs stay where they are, each
    runs once."""
    cluster = Cluster()
    try:
        cluster.start()
        async with deployment(
            cluster.url, tmp_path, latency=20, env={"NIMBUS_LEASE_TTL_S": "30"}
        ) as d:
            api = await d.api()
            await d.worker()
            run_ids = await _start_runs(api, 5)
            paused, owner = await _in_flight(d, run_ids)
            sweeper = await _trusting_sweeper(d)
            paused.process.send_signal(signal.SIGSTOP)
            try:
                cluster.stop()
                await asyncio.sleep(1)
                cluster.start()
                conn = await asyncpg.connect(d.database_url)
                try:
                    assert await conn.fetchval(_LOCK_FREE, owner)  # the paused worker's lock
                    deadline = time.monotonic() + 10
                    while '"worker.liveness_lock_taken"' not in sweeper.logs():
                        assert time.monotonic() < deadline, sweeper.logs()
                        await asyncio.sleep(0.05)
                    # The sweeper holds its lock again, sweeping every half second; the
                    # paused worker's is free. A sweeper without the guard takes its runs now.
                    await asyncio.sleep(2)
                    assert await conn.fetchval(_LOCK_FREE, owner)
                finally:
                    await conn.close()
            finally:
                paused.process.send_signal(signal.SIGCONT)
            d.fake.latency = 0.2
            await _until_done(d, run_ids)
            assert '"run.swept"' not in sweeper.logs()
            assert "Traceback" not in d.logs()
        assert [(r["status"], r["attempts"]) for r in await _attempts(d, run_ids)] == [
            ("success", 1)
        ] * len(run_ids)
    finally:
        cluster.remove()
