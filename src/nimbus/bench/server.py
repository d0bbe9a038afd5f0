"""``nimbus bench server``: what the Nimbus server adds to two-step tool-calling runs.

A fake OpenAI-compatible model server runs in its own process, pinned to a core, scripted to
ask for one calculator call and then answer. A real ``nimbus serve`` runs in another process,
pinned to another core, on SQLite or on a fresh PostgreSQL database. This process (the load
client, aiohttp, one keep-alive session) creates an assistant once, pre-creates threads, and
then does runs over HTTP, ``concurrency`` at a time, one of two ways:

- ``stream``: ``POST /threads/{id}/runs/stream`` with ``stream_mode="values"`` (SSE to the end);
- ``wait``: ``POST /threads/{id}/runs/wait`` (the thread's values when the run ends).

Each worker keeps a thread for ``turns`` runs in a row (a short conversation), then takes a
fresh one, so a thread's history stays short and the figures stay steady over long benchmarks.

Reported per database, mode and concurrency: runs/s, p50/p99 run latency, the latency the
server adds (run time minus the model's own ``2 × latency``), the server's CPU per run (from
``/proc/<pid>/stat``, all its threads), for a local PostgreSQL the CPU per run of the backends
connected to the bench database and of the cluster's background processes, and the CPU use of
the fake model server and of this client, to show they were not the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from nimbus.adapters.llm.openai import chat_request
from nimbus.adapters.tools.builtin import builtin_tools
from nimbus.aio import run_async
from nimbus.bench.processes import (
    DEFAULT_POSTGRES_URL,
    NimbusServer,
    PostgresCPUMeter,
    fresh_postgres_database,
    is_local,
    nimbus_server,
    proc_cpu_s,
)
from nimbus.core.messages import (
    AssistantMessage,
    Message,
    SystemMessage,
    ToolCall,
    ToolResultMessage,
    UserMessage,
)
from nimbus.core.model import ModelSettings
from nimbus.service.agents import agent_settings, build_agent
from nimbus.settings import Settings
from nimbus.testing.fake_openai import spawn_fake_server

Mode = Literal["stream", "wait"]
MODES: tuple[Mode, ...] = ("stream", "wait")
DATABASES = ("sqlite", "postgres")
TOOL_ARGUMENTS = '{"expression": "6 * 7"}'
EXPECTED_ANSWER = "The result is 42."
MODEL_CALLS_PER_RUN = 2
ERROR_KIND_CHARS = 160  # failed runs are counted by the start of what went wrong
PG_SAMPLE_S = 0.1  # how often PostgreSQL's processes are read: see PostgresCPUMeter
ASSISTANT_CONFIG = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
RUN_INPUT = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}


@dataclass
class Placement:
    """Cores the three processes are pinned to (``None``: not pinned)."""

    server_cpu: int | None
    model_cpu: int | None
    client_cpu: int | None

    def describe(self) -> str:
        """One line for the report."""

        def core(c: int | None) -> str:
            return "unpinned" if c is None else f"core {c}"

        return (
            f"nimbus server on {core(self.server_cpu)}, fake model on {core(self.model_cpu)}, "
            f"load client on {core(self.client_cpu)}, PostgreSQL unpinned"
        )


def default_placement(cores: list[int]) -> Placement:
    """The server gets a core to itself; the fake model and the client share one on 2 cores.

    The fake model and the client are the load generator: on a 2-core machine they share the
    second core so that the server, the thing measured, is alone on the first.
    """
    if len(cores) < 2:
        return Placement(None, None, None)
    return Placement(cores[0], cores[1], cores[2] if len(cores) > 2 else cores[1])


@dataclass
class CellResult:
    """Figures of one database × mode × concurrency."""

    database: str
    mode: str
    concurrency: int
    runs: int
    errors: int
    wall_s: float
    runs_per_s: float
    p50_ms: float
    p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    server_cpu_ms_per_run: float
    db_cpu_ms_per_run: float | None
    pg_aux_cpu_ms_per_run: float | None
    server_cpu_pct: float
    model_cpu_pct: float
    client_cpu_pct: float
    thread_create_ms: float
    pg_backends_seen: int | None
    error_kinds: dict[str, int]


# --- the load client --------------------------------------------------------------------


def _last_answer(values: Any) -> str | None:
    """Content of the last message of a thread's values, if any."""
    try:
        content = values["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def check_stream(body: bytes) -> str | None:
    """What is wrong with a ``stream_mode="values"`` SSE body; ``None`` when the run is right.

    Right: a ``metadata`` event first, then ``values`` events, no ``error`` event, and the
    last values end with the expected answer.
    """
    names: list[bytes] = []
    last_values: bytes | None = None
    for frame in body.split(b"\n\n"):
        name = data = b""
        for line in frame.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:]
            elif line.startswith(b"data: "):
                data = line[6:]
        if not name:
            continue
        names.append(name)
        if name == b"values":
            last_values = data
        elif name == b"error":
            return f"error event: {data[:300].decode(errors='replace')}"
    if not names or names[0] != b"metadata":
        return f"stream does not start with metadata: {[n.decode() for n in names[:5]]}"
    if last_values is None:
        return "no values event in the stream"
    answer = _last_answer(orjson.loads(last_values))
    return None if answer == EXPECTED_ANSWER else f"last values end with {answer!r}"


class LoadClient:
    """One aiohttp session (keep-alive) against a Nimbus server."""

    def __init__(self, server: NimbusServer, connections: int, by_graph: bool = False) -> None:
        self.base = server.url
        self.by_graph = by_graph  # runs name the assistant by its graph, not by its id
        self.headers = {"x-api-key": server.admin_key, "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        self.assistant_id = ""

    async def close(self) -> None:
        """Close the session."""
        await self.session.close()

    async def _post(self, path: str, body: Any) -> Any:
        async with self.session.post(
            self.base + path, data=orjson.dumps(body), headers=self.headers
        ) as r:
            data = await r.read()
            if r.status >= 300:
                raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
            return orjson.loads(data)

    async def create_assistant(self) -> None:
        """The calculator agent every run uses."""
        found = await self._post("/assistants", {"graph_id": "agent", "config": ASSISTANT_CONFIG})
        # by graph: the first assistant made from it, this one (the server's database is new)
        self.assistant_id = "agent" if self.by_graph else found["assistant_id"]

    async def create_thread(self) -> str:
        """A new, empty thread."""
        found = await self._post("/threads", {})
        return str(found["thread_id"])

    def _run_body(self, mode: Mode) -> bytes:
        body: dict[str, Any] = {"assistant_id": self.assistant_id, "input": RUN_INPUT}
        if mode == "stream":
            body["stream_mode"] = "values"
        return orjson.dumps(body)

    async def run(self, mode: Mode, thread_id: str) -> str | None:
        """One run on ``thread_id``; returns what was wrong with it, or ``None``."""
        url = f"{self.base}/threads/{thread_id}/runs/{mode}"
        async with self.session.post(url, data=self._run_body(mode), headers=self.headers) as r:
            data = await r.read()
        if r.status != 200:
            return f"HTTP {r.status}: {data[:300].decode(errors='replace')}"
        if mode == "stream":
            return check_stream(data)
        values = orjson.loads(data)
        if "__error__" in values:
            return f"run failed: {values['__error__']}"
        answer = _last_answer(values)
        return None if answer == EXPECTED_ANSWER else f"values end with {answer!r}"


@dataclass
class DriveOutcome:
    """Latencies (s) of the good runs, and the failed ones counted by what went wrong."""

    latencies: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """How many runs failed."""
        return sum(self.error_kinds.values())


async def drive(
    once: Callable[[str], Awaitable[str | None]],
    threads: list[str],
    runs: int,
    concurrency: int,
    turns: int,
) -> DriveOutcome:
    """Do ``runs`` runs, ``concurrency`` at a time; each worker does up to ``turns`` runs on a
    thread, one after another, then takes the next thread of ``threads``."""
    outcome = DriveOutcome()
    remaining = runs
    fresh = iter(threads)

    async def worker() -> None:
        nonlocal remaining
        thread: str | None = None
        used = 0
        while remaining > 0:
            remaining -= 1
            if thread is None or used >= turns:
                thread, used = next(fresh, thread), 0
            assert thread is not None, "too few threads"
            used += 1
            t0 = time.perf_counter()
            try:
                problem = await once(thread)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - t0
            if problem is None:
                outcome.latencies.append(elapsed)
                continue
            kind = problem[:ERROR_KIND_CHARS]
            outcome.error_kinds[kind] = outcome.error_kinds.get(kind, 0) + 1
            used = turns  # the thread may still be busy: move on

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcome


async def create_threads(
    client: LoadClient, count: int, concurrency: int
) -> tuple[list[str], float]:
    """``count`` new threads, ``concurrency`` at a time; and the mean time to create one (s)."""
    sem = asyncio.Semaphore(concurrency)
    spent = 0.0

    async def one() -> str:
        nonlocal spent
        async with sem:
            t0 = time.perf_counter()
            thread_id = await client.create_thread()
            spent += time.perf_counter() - t0
            return thread_id

    threads = list(await asyncio.gather(*(one() for _ in range(count))))
    return threads, spent / max(count, 1)


FLOOR_CALLS = 200  # two-call "runs" of the floor measurement


@dataclass
class Floor:
    """What two model calls back to back cost a caller with no server in between: HTTP on
    loopback and the fake model's own overhead. Any server pays this on top of the model's
    latency; what a server adds beyond it is its own."""

    runs: int
    added_p50_ms: float
    added_p99_ms: float


async def measure_floor(model_url: str, latency_s: float, runs: int = FLOOR_CALLS) -> Floor:
    """Call the fake model as the server would for one run (two chat requests, the second
    with the tool's result), ``runs`` times in a row, from this process."""
    # The requests the server sends for a run of the bench's assistant: its agent, its
    # tools, its model settings, in the OpenAI adapter's wire format.
    agent = build_agent("", agent_settings(ASSISTANT_CONFIG), Settings().default_model)
    tools = [t.spec for t in builtin_tools().resolve(agent.tools)]
    settings = ModelSettings(max_tokens=agent.limits.max_tokens, temperature=agent.temperature)
    first: list[Message] = [
        SystemMessage(agent.instructions),
        UserMessage(RUN_INPUT["messages"][0]["content"]),
    ]
    asked = AssistantMessage(tool_calls=[ToolCall("call_1", "calculator", TOOL_ARGUMENTS)])
    second = [*first, asked, ToolResultMessage("call_1", "calculator", "42")]
    model = agent.model.partition(":")[2]  # "openai:fake-model"
    bodies = [chat_request(model, m, tools, settings) for m in (first, second)]
    url = model_url + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(runs + 10):  # the first ten warm the connection up
            t0 = time.perf_counter()
            for body in bodies:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"fake model answered {r.status}")
            if i >= 10:
                latencies.append(time.perf_counter() - t0 - MODEL_CALLS_PER_RUN * latency_s)
    return Floor(runs, percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000)


async def _sample_every(meter: PostgresCPUMeter, period: float) -> None:
    """Sample ``meter`` every ``period`` seconds until cancelled."""
    while True:
        await asyncio.sleep(period)
        meter.sample()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (the value at rank ``q × n``); NaN without any."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class Target:
    """What one database's cells run against."""

    database: str
    server: NimbusServer
    model_pid: int
    pg_database: str | None  # set for a local PostgreSQL, whose processes we can read


async def measure_cell(
    client: LoadClient,
    target: Target,
    mode: Mode,
    runs: int,
    concurrency: int,
    turns: int,
    latency_s: float,
) -> CellResult:
    """Warm up, pre-create threads, then measure one mode at one concurrency."""
    warmup = min(runs, concurrency * 2)
    needed = math.ceil(runs / turns) + concurrency
    threads, thread_s = await create_threads(client, needed + warmup, concurrency)

    async def once(thread_id: str) -> str | None:
        return await client.run(mode, thread_id)

    await drive(once, threads[needed:], warmup, concurrency, 1)  # connections, caches, pools
    pid, model_pid = target.server.process.pid, target.model_pid
    pg = PostgresCPUMeter(target.pg_database) if target.pg_database else None
    sampler = None
    if pg is not None:
        pg.start()
        sampler = asyncio.create_task(_sample_every(pg, PG_SAMPLE_S))
    server0, model0 = proc_cpu_s(pid), proc_cpu_s(model_pid)
    client0, wall0 = time.process_time(), time.perf_counter()
    outcome = await drive(once, threads[:needed], runs, concurrency, turns)
    wall = time.perf_counter() - wall0
    client_cpu = time.process_time() - client0
    server_cpu, model_cpu = proc_cpu_s(pid) - server0, proc_cpu_s(model_pid) - model0
    if sampler is not None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler

    done = max(len(outcome.latencies), 1)
    model_s = MODEL_CALLS_PER_RUN * latency_s
    lat = outcome.latencies
    db_ms = aux_ms = None
    if pg is not None:
        pg.sample()
        if pg.backends_seen:
            db_ms = pg.seconds("backend") / done * 1000
            aux_ms = pg.seconds("aux") / done * 1000
    return CellResult(
        database=target.database,
        mode=mode,
        concurrency=concurrency,
        runs=len(lat),
        errors=outcome.errors,
        wall_s=wall,
        runs_per_s=len(lat) / wall,
        p50_ms=percentile(lat, 0.5) * 1000,
        p99_ms=percentile(lat, 0.99) * 1000,
        added_p50_ms=(percentile(lat, 0.5) - model_s) * 1000,
        added_p99_ms=(percentile(lat, 0.99) - model_s) * 1000,
        server_cpu_ms_per_run=server_cpu / done * 1000,
        db_cpu_ms_per_run=db_ms,
        pg_aux_cpu_ms_per_run=aux_ms,
        server_cpu_pct=server_cpu / wall * 100,
        model_cpu_pct=model_cpu / wall * 100,
        client_cpu_pct=client_cpu / wall * 100,
        thread_create_ms=thread_s * 1000,
        pg_backends_seen=pg.backends_seen if pg is not None else None,
        error_kinds=outcome.error_kinds,
    )


async def _measure_database(
    target: Target,
    *,
    runs: int,
    concurrencies: list[int],
    modes: list[Mode],
    turns: int,
    latency_s: float,
    by_graph: bool,
    report: Callable[[CellResult], None],
) -> list[CellResult]:
    client = LoadClient(target.server, max(concurrencies) + 8, by_graph)
    results: list[CellResult] = []
    try:
        await client.create_assistant()
        for c in concurrencies:
            for mode in modes:
                result = await measure_cell(client, target, mode, runs, c, turns, latency_s)
                results.append(result)
                report(result)
    finally:
        await client.close()
    return results


def bench_server(
    *,
    runs: int,
    concurrencies: list[int],
    latency_ms: float,
    modes: list[Mode],
    databases: list[str],
    postgres_url: str = DEFAULT_POSTGRES_URL,
    turns: int = 5,
    by_graph: bool = False,
    placement: Placement | None = None,
    report: Callable[[CellResult], None] = lambda _: None,
    announce: Callable[[str], None] = lambda _: None,
    on_floor: Callable[[Floor], None] = lambda _: None,
) -> list[CellResult]:
    """Run the benchmark; each cell's figures go to ``report`` as soon as they are measured.

    ``announce`` gets a line per database naming the server's pid (to profile it) and, after
    failed runs, where its log was kept; ``on_floor`` the :class:`Floor`, measured first.
    ``by_graph``: runs name their assistant by its graph (``agent``), not by its id.
    ``placement`` ``None`` pins nothing. This process's CPU affinity is restored at the end.
    """
    placement = placement or Placement(None, None, None)
    affinity = os.sched_getaffinity(0)
    proc, model_url = spawn_fake_server(latency_ms / 1000, TOOL_ARGUMENTS, cpu=placement.model_cpu)
    results: list[CellResult] = []
    try:
        # The floor is measured from the server's core, where the server's calls start.
        if placement.server_cpu is not None:
            os.sched_setaffinity(0, {placement.server_cpu})
        floor = run_async(measure_floor(model_url, latency_ms / 1000))
        on_floor(floor)
        os.sched_setaffinity(0, affinity)
        if placement.client_cpu is not None:
            os.sched_setaffinity(0, {placement.client_cpu})
        with tempfile.TemporaryDirectory(prefix="nimbus-bench-") as tmp:
            for database in databases:
                with contextlib.ExitStack() as stack:
                    pg_name: str | None = None
                    if database == "postgres":
                        url, name = stack.enter_context(fresh_postgres_database(postgres_url))
                        pg_name = name if is_local(url) else None
                        if pg_name is None:
                            announce("postgres: not on this machine, so its CPU is not measured")
                    else:
                        url = f"sqlite:///{tmp}/bench-{secrets.token_hex(4)}.db"
                    server = stack.enter_context(
                        nimbus_server(url, model_url, placement.server_cpu, Path(tmp))
                    )
                    announce(f"{database}: nimbus serve pid {server.process.pid}")
                    target = Target(database, server, proc.pid, pg_name)
                    cells = run_async(
                        _measure_database(
                            target,
                            runs=runs,
                            concurrencies=concurrencies,
                            modes=modes,
                            turns=turns,
                            latency_s=latency_ms / 1000,
                            by_graph=by_graph,
                            report=report,
                        )
                    )
                    results += cells
                    if any(c.errors for c in cells):
                        fd, kept = tempfile.mkstemp(
                            prefix=f"nimbus-bench-{database}-", suffix=".log"
                        )
                        os.close(fd)
                        shutil.copyfile(server.log, kept)
                        announce(f"{database}: runs failed; server log kept in {kept}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.sched_setaffinity(0, affinity)
    return results


def as_json(results: list[CellResult], placement: Placement, floor: Floor | None = None) -> bytes:
    """All figures as JSON."""
    return orjson.dumps(
        {
            "placement": asdict(placement),
            "floor": asdict(floor) if floor is not None else None,
            "results": [asdict(r) for r in results],
        },
        option=orjson.OPT_INDENT_2,
    )
