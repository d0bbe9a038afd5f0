"""``nimbus bench compare``: this Nimbus against another checkout, run for run.

On a shared or noisy machine two benchmark runs minutes apart differ by more than a small
change to the server does (``nimbus bench server``'s floor alone moves by a millisecond from
one run to the next). Here both servers run at once, each on its own database, pinned to the
same core, against one fake model server; the client does the same two-step tool-calling
run (see :mod:`nimbus.bench.server`) on one and then on the other, alternating which goes
first, one run at a time (or, with ``concurrency`` C, rounds of C runs at once, each round on
one side and then the other). Whatever the machine does meanwhile, both sides see it alike,
and the ratio of their figures is the change's.

The other checkout is given by its ``src`` folder (``git worktree add /tmp/base <rev>``, then
``/tmp/base/src``); its server runs on this checkout's Python environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nimbus
from nimbus.aio import run_async
from nimbus.bench.processes import (
    DEFAULT_POSTGRES_URL,
    NimbusServer,
    fresh_postgres_database,
    nimbus_server,
    proc_cpu_s,
)
from nimbus.bench.server import (
    MODEL_CALLS_PER_RUN,
    TOOL_ARGUMENTS,
    LoadClient,
    Mode,
    Placement,
    create_threads,
    percentile,
)
from nimbus.exceptions import UserError
from nimbus.testing.fake_openai import spawn_fake_server

WARMUP_RUNS = 20  # per side, not measured: connections, caches, the first plans


@dataclass
class Side:
    """One of the two servers and what it measured."""

    name: str
    src: Path
    added_s: list[float] = field(default_factory=list)  #: run time - the model's own latency
    cpu_s: float = 0.0  #: the server's CPU over the measured runs (all its threads)
    errors: list[str] = field(default_factory=list)
    version: str = ""  #: what its server's ``/info`` says

    def added_ms(self, q: float) -> float:
        """The ``q`` quantile of the added latency, in ms."""
        return percentile(self.added_s, q) * 1000

    @property
    def mean_ms(self) -> float:
        """The mean added latency, in ms."""
        return statistics.fmean(self.added_s) * 1000

    @property
    def cpu_ms_per_run(self) -> float:
        """The server's CPU per measured run, in ms."""
        return self.cpu_s / max(len(self.added_s) + len(self.errors), 1) * 1000


def checkout_src(path: str | Path) -> Path:
    """The ``src`` folder of a Nimbus checkout (or the checkout itself); a UserError if it
    holds no ``nimbus`` package."""
    given = Path(path).expanduser().resolve()
    for candidate in (given, given / "src"):
        if (candidate / "nimbus" / "__init__.py").is_file():
            return candidate
    raise UserError(f"{path} holds no Nimbus sources (no nimbus/__init__.py in it or in its src)")


def this_src() -> Path:
    """The ``src`` folder this package is imported from."""
    return Path(nimbus.__file__).resolve().parents[1]


async def _drive(
    sides: list[Side],
    servers: list[NimbusServer],
    mode: Mode,
    runs: int,
    turns: int,
    latency_s: float,
    by_graph: bool,
    concurrency: int = 1,
) -> None:
    c = concurrency
    clients = [LoadClient(server, c + 1, by_graph) for server in servers]
    try:
        for side, client in zip(sides, clients, strict=True):
            async with client.session.get(client.base + "/info") as r:
                side.version = str((await r.json())["version"])
            await client.create_assistant()
        warmup = -(-WARMUP_RUNS // c)  # rounds of c runs
        rounds = warmup + -(-runs // c)
        per_side = -(-rounds // turns) * c  # each round's runs on threads of their own
        threads = [(await create_threads(client, per_side, 8))[0] for client in clients]
        model_s = MODEL_CALLS_PER_RUN * latency_s

        async def one(k: int, thread_id: str) -> tuple[float, str | None]:
            t0 = time.perf_counter()
            try:
                problem = await clients[k].run(mode, thread_id)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            return time.perf_counter() - t0, problem

        cpu0: list[float] = []
        for i in range(rounds):
            if i == warmup:
                cpu0 = [proc_cpu_s(s.process.pid) for s in servers]
            order = (0, 1) if i % 2 == 0 else (1, 0)  # neither always goes first
            first = (i // turns) * c
            for k in order:
                done = await asyncio.gather(*(one(k, threads[k][first + j]) for j in range(c)))
                if i < warmup:
                    continue
                for elapsed, problem in done:
                    if problem is None:
                        sides[k].added_s.append(elapsed - model_s)
                    else:
                        sides[k].errors.append(problem)
        for side, server, before in zip(sides, servers, cpu0, strict=True):
            side.cpu_s = proc_cpu_s(server.process.pid) - before
    finally:
        for client in clients:
            await client.close()


def bench_compare(
    base_src: str | Path,
    *,
    runs: int,
    database: str,
    mode: Mode,
    latency_ms: float,
    turns: int = 5,
    by_graph: bool = False,
    placement: Placement | None = None,
    postgres_url: str = DEFAULT_POSTGRES_URL,
    concurrency: int = 1,
) -> tuple[Side, Side]:
    """Run the comparison; returns the other checkout's side ("base") and this one's."""
    sides = [Side("base", checkout_src(base_src)), Side("this", this_src())]
    placement = placement or Placement(None, None, None)
    affinity = os.sched_getaffinity(0)
    proc, model_url = spawn_fake_server(latency_ms / 1000, TOOL_ARGUMENTS, cpu=placement.model_cpu)
    try:
        if placement.client_cpu is not None:
            os.sched_setaffinity(0, {placement.client_cpu})
        with (
            tempfile.TemporaryDirectory(prefix="nimbus-compare-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            servers = []
            for side in sides:
                if database == "postgres":
                    url, _ = stack.enter_context(fresh_postgres_database(postgres_url))
                else:
                    url = f"sqlite:///{tmp}/{side.name}-{secrets.token_hex(4)}.db"
                server = nimbus_server(
                    url,
                    model_url,
                    placement.server_cpu,
                    Path(tmp),
                    env={"PYTHONPATH": str(side.src)},  # that checkout's package, not this one
                )
                servers.append(stack.enter_context(server))
            run_async(
                _drive(sides, servers, mode, runs, turns, latency_ms / 1000, by_graph, concurrency)
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.sched_setaffinity(0, affinity)
    return sides[0], sides[1]
