"""``nimbus bench runtime``: client cost of two-step tool-calling runs.

A fake OpenAI-compatible server runs in its own process, pinned to its own core, scripted
to ask for one tool call and then answer. In this process (pinned to another core) the same
workload runs three ways, one after the other, each on a fresh event loop:

- ``floor``: a hand-written loop over aiohttp + orjson (two POSTs and the tool in between);
- ``nimbus``: the real runtime (``nimbus.core.runtime.run``) with the ``openai:`` provider;
- ``openai-sdk``: the same hand-written loop over the official ``openai`` SDK.

Reported per mode: runs/s, p50/p99 run latency, client CPU per run and per step (process CPU
time over the measured runs), efficiency (runs/s ÷ the ideal C ÷ total model latency), and
the fake server's CPU use, to show its core was not the bottleneck.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import orjson

from nimbus.adapters.llm.openai import OpenAIModel
from nimbus.aio import run_async
from nimbus.core.agent import Agent, Limits
from nimbus.core.runtime import run
from nimbus.core.tool import Tool
from nimbus.testing.fake_openai import spawn_fake_server

PROMPT = "What is the weather in Paris?"
TOOL_ARGUMENTS = '{"city": "Paris"}'
STEPS_PER_RUN = 2


def get_weather(city: str) -> str:
    """The weather in a city (the benchmark's tool).

    Args:
        city: The city's name.
    """
    return f"Sunny, 21 C in {city}"


TOOL_SCHEMA = Tool.from_function(get_weather, run_in_thread=False)
WIRE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": TOOL_SCHEMA.name,
            "description": TOOL_SCHEMA.description,
            "parameters": TOOL_SCHEMA.parameters,
        },
    }
]


@dataclass
class ModeResult:
    """Figures of one mode at one concurrency."""

    mode: str
    concurrency: int
    runs: int
    errors: int
    wall_s: float
    runs_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_run: float
    cpu_us_per_step: float
    efficiency: float
    server_cpu_pct: float


RunOnce = Callable[[], Awaitable[str]]


class Workload:
    """Builds the three ways of doing one run against ``base_url``."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        self.base_url = base_url
        self.concurrency = concurrency

    async def floor(self) -> tuple[RunOnce, Callable[[], Awaitable[None]]]:
        """The hand-written aiohttp + orjson loop."""
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency + 8))
        url = self.base_url + "/chat/completions"
        headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}

        async def once() -> str:
            messages: list[dict[str, Any]] = [{"role": "user", "content": PROMPT}]
            body = {"model": "fake-model", "messages": messages, "tools": WIRE_TOOLS}
            async with session.post(url, data=orjson.dumps(body), headers=headers) as r:
                data = orjson.loads(await r.read())
            msg = data["choices"][0]["message"]
            call = msg["tool_calls"][0]
            result = get_weather(**orjson.loads(call["function"]["arguments"]))
            messages.append(msg)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            async with session.post(url, data=orjson.dumps(body), headers=headers) as r:
                data = orjson.loads(await r.read())
            return str(data["choices"][0]["message"]["content"])

        return once, session.close

    async def nimbus(self) -> tuple[RunOnce, Callable[[], Awaitable[None]]]:
        """The Nimbus runtime with the ``openai:`` provider."""
        model = OpenAIModel(
            "fake-model",
            base_url=self.base_url,
            api_key="bench",
            max_retries=0,
            max_connections=self.concurrency + 8,
        )
        agent = Agent(
            name="bench",
            instructions="",
            model=model.model_id,
            tools=["get_weather"],
            limits=Limits(max_tokens=None),
        )
        tools = [TOOL_SCHEMA]

        async def once() -> str:
            result = await run(agent, PROMPT, model=model, tools=tools)
            return result.output

        return once, model.aclose

    async def sdk(self) -> tuple[RunOnce, Callable[[], Awaitable[None]]]:
        """The same loop over the official ``openai`` SDK (httpx underneath)."""
        import openai

        try:  # openai >= 3 is built on httpx2, older releases on httpx
            import httpx2 as httpx
        except ImportError:
            import httpx  # type: ignore[no-redef]

        limits = httpx.Limits(
            max_connections=self.concurrency + 8, max_keepalive_connections=self.concurrency + 8
        )
        client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key="bench",
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits),
        )

        async def once() -> str:
            messages: list[Any] = [{"role": "user", "content": PROMPT}]
            first = await client.chat.completions.create(
                model="fake-model",
                messages=messages,
                tools=WIRE_TOOLS,  # type: ignore[arg-type]
            )
            msg = first.choices[0].message
            call = msg.tool_calls[0]  # type: ignore[index]
            result = get_weather(**orjson.loads(call.function.arguments))  # type: ignore[union-attr]
            messages.append(msg.model_dump(exclude_none=True))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            second = await client.chat.completions.create(
                model="fake-model",
                messages=messages,
                tools=WIRE_TOOLS,  # type: ignore[arg-type]
            )
            return second.choices[0].message.content or ""

        return once, client.close


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def drive(once: RunOnce, runs: int, concurrency: int) -> tuple[list[float], int]:
    """Do ``runs`` runs, ``concurrency`` at a time; returns latencies (s) and the error count."""
    latencies: list[float] = []
    errors = 0
    remaining = runs

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                answer = await once()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if "Sunny" not in answer:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def measure_mode(
    mode: str, base_url: str, runs: int, concurrency: int, latency_s: float, server_pid: int
) -> ModeResult:
    """Warm up, then measure one mode at one concurrency."""
    workload = Workload(base_url, concurrency)
    once, close = await getattr(workload, mode.replace("openai-sdk", "sdk"))()
    try:
        await drive(once, min(runs, concurrency * 2), concurrency)  # open connections, warm caches
        server0 = _proc_cpu_s(server_pid)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        latencies, errors = await drive(once, runs, concurrency)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        server_cpu = _proc_cpu_s(server_pid) - server0
    finally:
        await close()
    done = max(len(latencies), 1)
    latencies.sort()
    rate = len(latencies) / wall
    ideal = concurrency / (STEPS_PER_RUN * latency_s) if latency_s > 0 else float("nan")
    return ModeResult(
        mode=mode,
        concurrency=concurrency,
        runs=len(latencies),
        errors=errors,
        wall_s=wall,
        runs_per_s=rate,
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        if latencies
        else float("nan"),
        cpu_us_per_run=cpu / done * 1e6,
        cpu_us_per_step=cpu / done / STEPS_PER_RUN * 1e6,
        efficiency=rate / ideal if latency_s > 0 else float("nan"),
        server_cpu_pct=server_cpu / wall * 100,
    )


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bench_runtime(
    *,
    runs: int,
    concurrencies: list[int],
    latency_ms: float,
    modes: list[str],
    client_cpu: int | None,
    server_cpu: int | None,
    report: Callable[[ModeResult], None],
) -> list[ModeResult]:
    """Run the benchmark; each mode's figures go to ``report`` as soon as they are measured."""
    _raise_fd_limit()
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    proc, base_url = spawn_fake_server(latency_ms / 1000, TOOL_ARGUMENTS, cpu=server_cpu)
    results: list[ModeResult] = []
    try:
        for c in concurrencies:
            for mode in modes:
                result = run_async(
                    measure_mode(mode, base_url, runs, c, latency_ms / 1000, proc.pid)
                )
                results.append(result)
                report(result)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return results


def summary(results: list[ModeResult]) -> list[dict[str, Any]]:
    """Per concurrency: Nimbus CPU per run as a ratio to the floor and to the SDK."""
    rows = []
    for c in sorted({r.concurrency for r in results}):
        by_mode = {r.mode: r for r in results if r.concurrency == c}
        nimbus = by_mode.get("nimbus")
        if nimbus is None:
            continue
        row: dict[str, Any] = {"concurrency": c, "nimbus_efficiency": nimbus.efficiency}
        if "floor" in by_mode:
            row["nimbus_cpu_vs_floor"] = nimbus.cpu_us_per_run / by_mode["floor"].cpu_us_per_run
        if "openai-sdk" in by_mode:
            row["sdk_cpu_vs_nimbus"] = by_mode["openai-sdk"].cpu_us_per_run / nimbus.cpu_us_per_run
        rows.append(row)
    return rows


def as_json(results: list[ModeResult]) -> bytes:
    """All figures and the summary as JSON."""
    return orjson.dumps(
        {"results": [asdict(r) for r in results], "summary": summary(results)},
        option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
    )
