"""``nimbus bench scale``: throughput of worker processes holding many runs in flight.

One ``nimbus serve --api-only`` and 1 or 2 ``nimbus worker --concurrency C`` processes share
a fresh PostgreSQL database; the model is the fake OpenAI server (its own process) with a
fixed latency, so a two-step tool-calling run spends ``2 × latency`` waiting on the model.
The load client keeps ``workers × C`` runs in flight (``POST /runs/wait``, a new run as soon
as one ends): with the model's latency dominating, ideal throughput is
``workers × C / (2 × latency)`` runs/s.

Reported per cell: runs/s in a steady window (after a warm-up), efficiency (measured ÷
ideal), p50/p99 run latency, p99 queue wait (from a run's creation to its claim by a worker,
from ``run_attempts``), each worker's resident memory per run in flight (its RSS at full
load minus its RSS idle, ÷ C), and the CPU per run of the API and of the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from nimbus.aio import run_async
from nimbus.bench.processes import (
    NimbusServer,
    fresh_postgres_database,
    nimbus_server,
    proc_cpu_s,
    proc_rss_bytes,
)
from nimbus.bench.server import (
    ASSISTANT_CONFIG,
    EXPECTED_ANSWER,
    RUN_INPUT,
    TOOL_ARGUMENTS,
    percentile,
)
from nimbus.testing.fake_openai import spawn_fake_server

ERROR_KIND_CHARS = 160


@dataclass
class ScaleResult:
    """Figures of one number of workers × runs in flight per worker."""

    workers: int
    concurrency: int  #: runs in flight per worker
    latency_s: float
    runs: int  #: runs finished in the window
    errors: int
    window_s: float
    runs_per_s: float
    ideal_runs_per_s: float
    efficiency: float
    p50_s: float
    p99_s: float
    queue_wait_p50_ms: float
    queue_wait_p99_ms: float
    rss_idle_mb: list[float]
    rss_loaded_mb: list[float]
    kib_per_run: list[float]  #: per worker: (loaded - idle RSS) / C
    api_cpu_ms_per_run: float
    worker_cpu_ms_per_run: float
    error_kinds: dict[str, int] = field(default_factory=dict)


async def _drive(
    api: NimbusServer,
    in_flight: int,
    warmup_s: float,
    window_s: float,
    workers: list[NimbusServer],
) -> tuple[list[tuple[float, float]], dict[str, int], list[int], float, float]:
    """Keep ``in_flight`` runs going for ``warmup_s + window_s``; returns (start, end) of each
    good run, errors by kind, the workers' peak RSS in the window, and the CPU seconds of the
    API and of the workers over the window."""
    headers = {"x-api-key": api.admin_key, "Content-Type": "application/json"}
    done: list[tuple[float, float]] = []
    errors: dict[str, int] = {}
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=600),
    )
    try:
        async with session.post(
            api.url + "/assistants",
            data=orjson.dumps({"graph_id": "agent", "config": ASSISTANT_CONFIG}),
            headers=headers,
        ) as r:
            assistant = (await r.json())["assistant_id"]
        body = orjson.dumps(
            {"assistant_id": assistant, "input": RUN_INPUT, "on_completion": "keep"}
        )
        stop_at = time.monotonic() + warmup_s + window_s

        ramp_s = min(warmup_s / 2, 5.0)  # clients arrive over a few seconds, not all at once

        async def loop(i: int) -> None:
            await asyncio.sleep(ramp_s * i / in_flight)
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    async with session.post(
                        api.url + "/runs/wait", data=body, headers=headers
                    ) as r:
                        data = await r.read()
                    problem = None
                    if r.status != 200:
                        problem = f"HTTP {r.status}: {data[:200].decode(errors='replace')}"
                    else:
                        messages = orjson.loads(data).get("messages") or [{}]
                        if messages[-1].get("content") != EXPECTED_ANSWER:
                            problem = f"unexpected answer {messages[-1].get('content')!r}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is None:
                    done.append((started, time.monotonic()))
                else:
                    kind = problem[:ERROR_KIND_CHARS]
                    errors[kind] = errors.get(kind, 0) + 1
                    await asyncio.sleep(0.1)

        async def watch() -> tuple[list[int], float, float]:
            await asyncio.sleep(warmup_s)
            cpu0 = proc_cpu_s(api.process.pid), sum(proc_cpu_s(w.process.pid) for w in workers)
            peak = [0] * len(workers)
            while time.monotonic() < stop_at:
                for i, w in enumerate(workers):
                    peak[i] = max(peak[i], proc_rss_bytes(w.process.pid))
                await asyncio.sleep(0.5)
            api_cpu = proc_cpu_s(api.process.pid) - cpu0[0]
            worker_cpu = sum(proc_cpu_s(w.process.pid) for w in workers) - cpu0[1]
            return peak, api_cpu, worker_cpu

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(loop(i) for i in range(in_flight)))
        peak, api_cpu, worker_cpu = await watcher
    finally:
        await session.close()
    return done, errors, peak, api_cpu, worker_cpu


async def _queue_waits(url: str, since: float, until: float) -> list[float]:
    """Seconds from creation to first claim of the runs created in the window (wall clock)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """
            SELECT extract(epoch FROM a.claimed_at - r.created_at) AS wait
            FROM runs r JOIN run_attempts a ON a.run_id = r.run_id AND a.attempt = 1
            WHERE r.created_at BETWEEN to_timestamp($1) AND to_timestamp($2)
            """,
            since,
            until,
        )
    finally:
        await conn.close()
    return [float(r["wait"]) for r in rows]


def measure(
    admin_url: str,
    model_url: str,
    workers: int,
    concurrency: int,
    latency_s: float,
    warmup_s: float,
    window_s: float,
    workdir: Path,
) -> ScaleResult:
    """One cell, on a fresh database."""
    key = "nmb_bench_" + secrets.token_hex(16)
    env = {
        "NIMBUS_WORKERS": str(concurrency),
        "NIMBUS_DATABASE_POOL_SIZE": "10",  # 3 processes x (3 x 10 + 1) within 100 connections
        "NIMBUS_LOG_FORMAT": "json",
        "NIMBUS_MODEL_TIMEOUT_S": str(max(60.0, latency_s * 10)),
    }
    with (
        fresh_postgres_database(admin_url) as (url, _),
        contextlib.ExitStack() as stack,
    ):
        api = stack.enter_context(
            nimbus_server(url, model_url, None, workdir, ("serve", "--api-only"), key, env)
        )
        procs = [
            stack.enter_context(
                nimbus_server(
                    url,
                    model_url,
                    None,
                    workdir,
                    ("worker", "--concurrency", str(concurrency)),
                    key,
                    env,
                )
            )
            for _ in range(workers)
        ]
        time.sleep(1.0)
        idle = [proc_rss_bytes(w.process.pid) for w in procs]
        wall0 = time.time()
        done, errors, peak, api_cpu, worker_cpu = run_async(
            _drive(api, workers * concurrency, warmup_s, window_s, procs)
        )
        # the window, as wall-clock times, for the queue waits
        mono_to_wall = time.time() - time.monotonic()
        start = min((s for s, _ in done), default=time.monotonic())
        w0 = start + warmup_s
        in_window = [(s, e) for s, e in done if w0 <= e < w0 + window_s]
        waits = run_async(_queue_waits(url, w0 + mono_to_wall, w0 + window_s + mono_to_wall))
    del wall0
    runs = len(in_window)
    rate = runs / window_s
    ideal = workers * concurrency / (2 * latency_s)
    latencies = [e - s for s, e in in_window]
    return ScaleResult(
        workers=workers,
        concurrency=concurrency,
        latency_s=latency_s,
        runs=runs,
        errors=sum(errors.values()),
        window_s=window_s,
        runs_per_s=rate,
        ideal_runs_per_s=ideal,
        efficiency=rate / ideal,
        p50_s=percentile(latencies, 0.5),
        p99_s=percentile(latencies, 0.99),
        queue_wait_p50_ms=percentile(waits, 0.5) * 1000,
        queue_wait_p99_ms=percentile(waits, 0.99) * 1000,
        rss_idle_mb=[b / 2**20 for b in idle],
        rss_loaded_mb=[b / 2**20 for b in peak],
        kib_per_run=[(p - i) / 1024 / concurrency for p, i in zip(peak, idle, strict=True)],
        api_cpu_ms_per_run=api_cpu * 1000 / max(runs, 1),
        worker_cpu_ms_per_run=worker_cpu * 1000 / max(runs, 1),
        error_kinds=errors,
    )


def bench_scale(
    *,
    workers: list[int],
    concurrencies: list[int],
    latency_s: float,
    warmup_s: float,
    window_s: float,
    postgres_url: str,
    report: Callable[[ScaleResult], None],
) -> list[ScaleResult]:
    """Every cell of ``workers`` × ``concurrencies``."""
    proc, model_url = spawn_fake_server(latency_s, TOOL_ARGUMENTS)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="nimbus-bench-scale-") as tmp:
            for n in workers:
                for c in concurrencies:
                    result = measure(
                        postgres_url, model_url, n, c, latency_s, warmup_s, window_s, Path(tmp)
                    )
                    report(result)
                    results.append(result)
    finally:
        proc.terminate()
        proc.wait()
    return results


def as_json(results: list[ScaleResult]) -> bytes:
    """The figures as JSON."""
    data: list[dict[str, Any]] = [asdict(r) for r in results]
    return orjson.dumps(data, option=orjson.OPT_INDENT_2)
