"""``nimbus bench …``: benchmarks (figures come from here, never from timed tests)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console

from nimbus.exceptions import UserError

if TYPE_CHECKING:
    from nimbus.bench.server import Placement

bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)

MODES = ("floor", "nimbus", "openai-sdk")


# Options shared by the server benchmarks.
Turns = Annotated[
    int, typer.Option(min=1, help="Runs per thread, one after another (a conversation).")
]
ServerCpu = Annotated[
    int | None, typer.Option(help="Core for the Nimbus server(s) (default: the first).")
]
ModelCpu = Annotated[
    int | None, typer.Option(help="Core for the fake model server (default: the second).")
]
ByGraph = Annotated[
    bool,
    typer.Option(
        "--by-graph",
        help="Runs name their assistant by its graph (`agent`), as LangGraph's examples do, "
        "not by its id.",
    ),
]
ClientCpu = Annotated[
    int | None,
    typer.Option(help="Core for this load client (default: the third, else the second)."),
]


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"{what} must be a comma-separated list of integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{what} must list positive integers, got {text!r}")
    return values


@bench_app.command("runtime")
def runtime(
    runs: Annotated[
        int, typer.Option(min=1, help="Measured runs per mode and concurrency.")
    ] = 3000,
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c", help="Comma-separated concurrencies.")
    ] = "32,256,512",
    latency_ms: Annotated[
        float, typer.Option(min=0, help="Fake model latency per call, in ms.")
    ] = 50.0,
    modes: Annotated[str, typer.Option(help="Comma-separated: floor,nimbus,openai-sdk.")] = (
        ",".join(MODES)
    ),
    client_cpu: Annotated[int | None, typer.Option(help="Core to pin this process to.")] = 0,
    server_cpu: Annotated[int | None, typer.Option(help="Core to pin the fake server to.")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="Print figures as JSON.")] = False,
) -> None:
    """Two-step tool-calling runs against a fake OpenAI-compatible server in another process."""
    from nimbus.bench.runtime import ModeResult, as_json, bench_runtime, summary

    concurrencies = _int_list(concurrency, "--concurrency")
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODES]
    if unknown or not chosen:
        raise UserError(f"unknown mode(s) {unknown or modes!r}; modes: {', '.join(MODES)}")
    cores = os.cpu_count() or 1
    for name, core in (("--client-cpu", client_cpu), ("--server-cpu", server_cpu)):
        if core is not None and not 0 <= core < cores:
            raise UserError(f"{name} {core} is not a core of this machine (0-{cores - 1})")
    if "openai-sdk" in chosen:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise UserError(
                "mode openai-sdk needs the openai package: pip install openai"
            ) from None
    console = Console(stderr=json_output, highlight=False, width=120)
    console.print(
        f"fake model latency {latency_ms:g} ms/call, {runs} runs per mode, "
        f"client on core {client_cpu}, server on core {server_cpu}"
    )
    header = (
        f"{'mode':<11}{'C':>5}{'runs/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU us/run':>12}{'us/step':>9}{'effic.':>8}{'server CPU':>11}{'errors':>7}"
    )
    console.print(header)

    def report(r: ModeResult) -> None:
        console.print(
            f"{r.mode:<11}{r.concurrency:>5}{r.runs_per_s:>10.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
            f"{r.cpu_us_per_run:>12.0f}{r.cpu_us_per_step:>9.0f}{r.efficiency:>8.1%}"
            f"{r.server_cpu_pct:>10.0f}%{r.errors:>7}"
        )

    results = bench_runtime(
        runs=runs,
        concurrencies=concurrencies,
        latency_ms=latency_ms,
        modes=chosen,
        client_cpu=client_cpu if cores > 1 else None,
        server_cpu=server_cpu if cores > 1 else None,
        report=report,
    )
    for row in summary(results):
        parts = [f"C={row['concurrency']}: nimbus efficiency {row['nimbus_efficiency']:.1%}"]
        if "nimbus_cpu_vs_floor" in row:
            parts.append(f"CPU/run {row['nimbus_cpu_vs_floor']:.2f}x the aiohttp floor")
        if "sdk_cpu_vs_nimbus" in row:
            parts.append(f"openai SDK uses {row['sdk_cpu_vs_nimbus']:.1f}x the CPU of nimbus")
        console.print(", ".join(parts))
    if json_output:
        sys.stdout.write(as_json(results).decode() + "\n")
    if any(r.errors for r in results):
        raise typer.Exit(1)


@bench_app.command("server")
def server(
    runs: Annotated[
        int, typer.Option(min=1, help="Measured runs per database, mode and concurrency.")
    ] = 300,
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c", help="Comma-separated concurrencies.")
    ] = "1,16,64",
    latency_ms: Annotated[
        float, typer.Option(min=0, help="Fake model latency per call, in ms.")
    ] = 20.0,
    modes: Annotated[str, typer.Option(help="Comma-separated: stream,wait.")] = "stream,wait",
    database: Annotated[str, typer.Option(help="sqlite, postgres or both.")] = "both",
    postgres_url: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL server to create the bench database on "
            "(default NIMBUS_TEST_POSTGRES_URL, else postgresql://postgres@127.0.0.1:5432/postgres)."
        ),
    ] = None,
    turns: Turns = 5,
    by_graph: ByGraph = False,
    server_cpu: ServerCpu = None,
    model_cpu: ModelCpu = None,
    client_cpu: ClientCpu = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print figures as JSON.")] = False,
) -> None:
    """Two-step tool-calling runs over HTTP against a live `nimbus serve` (stream and wait)."""
    from nimbus.bench.processes import DEFAULT_POSTGRES_URL, check_postgres
    from nimbus.bench.server import (
        DATABASES,
        MODES,
        CellResult,
        Floor,
        Mode,
        as_json,
        bench_server,
    )

    concurrencies = _int_list(concurrency, "--concurrency")
    chosen: list[Mode] = []
    for m in (m.strip() for m in modes.split(",") if m.strip()):
        if m not in MODES:
            raise UserError(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
        chosen.append(m)
    if not chosen:
        raise UserError(f"--modes lists no mode; modes: {', '.join(MODES)}")
    if database not in (*DATABASES, "both"):
        raise UserError(f"--database must be sqlite, postgres or both, got {database!r}")
    databases = list(DATABASES) if database == "both" else [database]
    placement = _placement(server_cpu, model_cpu, client_cpu)
    pg_url = postgres_url or os.environ.get("NIMBUS_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    if "postgres" in databases:
        check_postgres(pg_url)

    console = Console(stderr=json_output, highlight=False, width=150)
    for line in (
        f"fake model: {latency_ms:g} ms/call, 2 calls/run; {runs} runs per cell, "
        f"{turns} runs per thread{'; the assistant named by its graph' if by_graph else ''}",
        f"placement: {placement.describe()}",
        "added = run time - 2 x model latency; srv ms = nimbus server CPU per run (all threads)",
        "DB ms = CPU per run of the PostgreSQL backends of the bench database; PG aux = CPU per "
        "run of the cluster's shared processes (WAL writer, checkpointer, ...)",
    ):
        console.print(line)
    header = (
        f"{'db':<9}{'mode':<7}{'C':>4}{'runs/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'added p50':>10}{'added p99':>10}{'srv ms':>8}{'DB ms':>7}{'PG aux':>7}"
        f"{'srv CPU':>8}{'model':>7}{'client':>7}{'errors':>7}"
    )
    console.print(header)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def report(r: CellResult) -> None:
        console.print(
            f"{r.database:<9}{r.mode:<7}{r.concurrency:>4}{r.runs_per_s:>9.1f}{r.p50_ms:>9.1f}"
            f"{r.p99_ms:>9.1f}{r.added_p50_ms:>10.1f}{r.added_p99_ms:>10.1f}"
            f"{r.server_cpu_ms_per_run:>8.2f}{ms(r.db_cpu_ms_per_run):>7}"
            f"{ms(r.pg_aux_cpu_ms_per_run):>7}{r.server_cpu_pct:>7.0f}%{r.model_cpu_pct:>6.0f}%"
            f"{r.client_cpu_pct:>6.0f}%{r.errors:>7}"
        )
        for kind, count in r.error_kinds.items():
            console.print(f"  {count} x {kind}", markup=False)

    floors: list[Floor] = []

    def on_floor(floor: Floor) -> None:
        floors.append(floor)
        console.print(
            f"floor: {floor.runs} times two model calls back to back from the server's core, "
            f"no server: added p50 {floor.added_p50_ms:.1f} ms, p99 {floor.added_p99_ms:.1f} ms "
            "(loopback HTTP and the fake model's own overhead, paid by any server; the rest "
            "of 'added' is the server's own)"
        )

    results = bench_server(
        runs=runs,
        concurrencies=concurrencies,
        latency_ms=latency_ms,
        modes=chosen,
        databases=databases,
        postgres_url=pg_url,
        turns=turns,
        by_graph=by_graph,
        placement=placement,
        report=report,
        announce=console.print,
        on_floor=on_floor,
    )
    if results:
        model = max(r.model_cpu_pct for r in results)
        client = max(r.client_cpu_pct for r in results)
        console.print(
            f"fake model server at most {model:.0f}% of a core, load client at most {client:.0f}%"
            f" (together {model + client:.0f}% at most): the load generator was not the bottleneck"
            if model + client < 80
            else f"fake model server up to {model:.0f}% of a core, client up to {client:.0f}%: "
            "the load generator may have limited the figures"
        )
    if json_output:
        sys.stdout.write(as_json(results, placement, floors[0] if floors else None).decode() + "\n")
    if any(r.errors for r in results):
        raise typer.Exit(1)


def _placement(server_cpu: int | None, model_cpu: int | None, client_cpu: int | None) -> Placement:
    """The default placement of the server benchmarks, with the cores given instead."""
    from nimbus.bench.server import default_placement

    cores = sorted(os.sched_getaffinity(0))
    placement = default_placement(cores)
    for name, core, field in (
        ("--server-cpu", server_cpu, "server_cpu"),
        ("--model-cpu", model_cpu, "model_cpu"),
        ("--client-cpu", client_cpu, "client_cpu"),
    ):
        if core is None:
            continue
        if core not in cores:
            raise UserError(f"{name} {core} is not a core this process may use ({cores})")
        setattr(placement, field, core)
    return placement


@bench_app.command("compare")
def compare(
    base: Annotated[
        str,
        typer.Argument(
            help="The other checkout (or its src folder), e.g. from "
            "`git worktree add /tmp/base <rev>`."
        ),
    ],
    runs: Annotated[int, typer.Option(min=1, help="Measured runs per server.")] = 600,
    database: Annotated[str, typer.Option(help="sqlite or postgres.")] = "sqlite",
    mode: Annotated[str, typer.Option(help="stream or wait.")] = "stream",
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            "-c",
            min=1,
            max=256,
            help="Runs at once: rounds of this many, each round on one server then the other.",
        ),
    ] = 1,
    latency_ms: Annotated[
        float, typer.Option(min=0, help="Fake model latency per call, in ms.")
    ] = 20.0,
    turns: Turns = 5,
    by_graph: ByGraph = False,
    postgres_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL server for the two databases (as for `bench server`)."),
    ] = None,
    server_cpu: ServerCpu = None,
    model_cpu: ModelCpu = None,
    client_cpu: ClientCpu = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print figures as JSON.")] = False,
) -> None:
    """This Nimbus against another checkout, run for run (interleaved, same core): the
    figures of `bench server` at concurrency 1 (or rounds of -c runs at once), as a ratio
    that machine noise cancels out of."""
    from nimbus.bench.compare import bench_compare, checkout_src
    from nimbus.bench.processes import DEFAULT_POSTGRES_URL, check_postgres
    from nimbus.bench.server import DATABASES, MODES

    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if database not in DATABASES:
        raise UserError(f"--database must be sqlite or postgres, got {database!r}")
    base_src = checkout_src(base)
    placement = _placement(server_cpu, model_cpu, client_cpu)
    pg_url = postgres_url or os.environ.get("NIMBUS_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    if database == "postgres":
        check_postgres(pg_url)
    console = Console(stderr=json_output, highlight=False, width=120)
    console.print(
        f"{database}, {mode}, {runs} runs per server, {concurrency} at once, "
        f"fake model {latency_ms:g} ms/call; "
        f"{'the assistant named by its graph; ' if by_graph else ''}"
        f"base: {base_src}; placement: {placement.describe()}"
    )
    sides = bench_compare(
        base_src,
        runs=runs,
        database=database,
        mode=mode,
        latency_ms=latency_ms,
        turns=turns,
        by_graph=by_graph,
        placement=placement,
        postgres_url=pg_url,
        concurrency=concurrency,
    )
    console.print(
        f"{'server':<7}{'version':<12}{'added p50':>10}{'p90':>8}{'p99':>8}{'mean':>8}"
        f"{'CPU ms/run':>12}{'errors':>8}"
    )
    for side in sides:
        console.print(
            f"{side.name:<7}{side.version:<12}{side.added_ms(0.5):>10.2f}{side.added_ms(0.9):>8.2f}"
            f"{side.added_ms(0.99):>8.2f}{side.mean_ms:>8.2f}{side.cpu_ms_per_run:>12.2f}"
            f"{len(side.errors):>8}"
        )
        for problem in sorted(set(side.errors)):
            console.print(f"  {side.errors.count(problem)} x {problem[:160]}", markup=False)
    base_side, this = sides
    ratios = {
        "added_p50": this.added_ms(0.5) / base_side.added_ms(0.5),
        "added_mean": this.mean_ms / base_side.mean_ms,
        "cpu_per_run": this.cpu_ms_per_run / base_side.cpu_ms_per_run,
    }
    console.print(
        "this / base: added p50 {added_p50:.3f}, mean {added_mean:.3f}, "
        "CPU per run {cpu_per_run:.3f}".format(**ratios)
    )
    if json_output:
        figures = {
            side.name: {
                "src": str(side.src),
                "version": side.version,
                "runs": len(side.added_s),
                "errors": len(side.errors),
                "added_p50_ms": side.added_ms(0.5),
                "added_p90_ms": side.added_ms(0.9),
                "added_p99_ms": side.added_ms(0.99),
                "added_mean_ms": side.mean_ms,
                "cpu_ms_per_run": side.cpu_ms_per_run,
            }
            for side in sides
        }
        out = {
            "database": database,
            "mode": mode,
            "concurrency": concurrency,
            "latency_ms": latency_ms,
            **figures,
        }
        sys.stdout.write(orjson.dumps({**out, "ratios": ratios}).decode() + "\n")
    if any(side.errors for side in sides):
        raise typer.Exit(1)


@bench_app.command("scale")
def scale(
    workers: Annotated[
        str, typer.Option(help="Comma-separated numbers of worker processes.")
    ] = "1,2",
    concurrency: Annotated[
        str,
        typer.Option("--concurrency", "-c", help="Comma-separated runs in flight per worker."),
    ] = "100,500,2000",
    latency_s: Annotated[
        float, typer.Option(min=0.01, help="Fake model latency per call, in seconds.")
    ] = 2.0,
    warmup_s: Annotated[float, typer.Option(min=0, help="Seconds before measuring.")] = 10.0,
    window_s: Annotated[float, typer.Option(min=1, help="Seconds measured per cell.")] = 20.0,
    postgres_url: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL server to create the bench databases on "
            "(default NIMBUS_TEST_POSTGRES_URL, else postgresql://postgres@127.0.0.1:5432/postgres)."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print figures as JSON.")] = False,
) -> None:
    """Runs in flight per worker process: 1 API + N workers on PostgreSQL, a fake model."""
    from nimbus.bench.processes import DEFAULT_POSTGRES_URL, check_postgres
    from nimbus.bench.scale import ScaleResult, as_json, bench_scale

    counts = _int_list(workers, "--workers")
    concurrencies = _int_list(concurrency, "--concurrency")
    pg_url = postgres_url or os.environ.get("NIMBUS_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    check_postgres(pg_url)
    console = Console(stderr=json_output, highlight=False, width=160)
    console.print(
        f"fake model: {latency_s:g} s/call, 2 calls/run; 1 API-only server + N workers; "
        f"{warmup_s:g} s warm-up, {window_s:g} s measured per cell; ideal = N x C / (2 x latency)"
    )
    console.print(
        f"{'N':>2}{'C/worker':>9}{'runs/s':>9}{'ideal':>8}{'effic.':>8}{'p50 s':>8}{'p99 s':>8}"
        f"{'qwait p50':>10}{'qwait p99':>10}{'KiB/run':>14}{'RSS MB':>16}{'API ms':>8}"
        f"{'wrk ms':>8}{'errors':>7}"
    )

    def report(r: ScaleResult) -> None:
        kib = "/".join(f"{k:.0f}" for k in r.kib_per_run)
        rss = "/".join(f"{m:.0f}" for m in r.rss_loaded_mb)
        console.print(
            f"{r.workers:>2}{r.concurrency:>9}{r.runs_per_s:>9.1f}{r.ideal_runs_per_s:>8.1f}"
            f"{r.efficiency:>8.0%}{r.p50_s:>8.2f}{r.p99_s:>8.2f}{r.queue_wait_p50_ms:>10.1f}"
            f"{r.queue_wait_p99_ms:>10.1f}{kib:>14}{rss:>16}{r.api_cpu_ms_per_run:>8.2f}"
            f"{r.worker_cpu_ms_per_run:>8.2f}{r.errors:>7}"
        )
        for kind, count in r.error_kinds.items():
            console.print(f"  {count} x {kind}", markup=False)

    results = bench_scale(
        workers=counts,
        concurrencies=concurrencies,
        latency_s=latency_s,
        warmup_s=warmup_s,
        window_s=window_s,
        postgres_url=pg_url,
        report=report,
    )
    if json_output:
        sys.stdout.write(as_json(results).decode() + "\n")
    if any(r.errors for r in results):
        raise typer.Exit(1)


@bench_app.command("floods")
def floods(
    database: Annotated[str, typer.Option(help="sqlite or postgres.")] = "sqlite",
    flood: Annotated[
        list[str] | None,
        typer.Option("--flood", help="A flood to run (repeat the option); default: every one."),
    ] = None,
    victim_reads: Annotated[
        int, typer.Option(min=10, help="Reads of the victim tenant before each flood.")
    ] = 200,
    postgres_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL server for --database postgres (a fresh database each)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print figures as JSON.")] = False,
) -> None:
    """Floods one tenant can send, and what each costs the server and its other tenants."""
    from nimbus.bench.floods import FLOODS, FloodResult, as_json, bench_floods
    from nimbus.bench.processes import DEFAULT_POSTGRES_URL, check_postgres

    if database not in ("sqlite", "postgres"):
        raise UserError("--database must be sqlite or postgres")
    chosen = flood or list(FLOODS)
    unknown = [f for f in chosen if f not in FLOODS]
    if unknown:
        raise UserError(f"unknown flood {unknown[0]!r}; floods: {', '.join(FLOODS)}")
    pg_url = postgres_url or os.environ.get("NIMBUS_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    if database == "postgres":
        check_postgres(pg_url)
    console = Console(stderr=json_output, highlight=False, width=180)
    console.print(
        f"{'flood':<20}{'attacks':>8}{'accepted':>9}{'refused':>8}{'refuse p50 ms':>14}"
        f"{'victim p50 ms before':>21}{'during':>8}{'p99':>8}{'failed':>7}{'DB B/attack':>12}"
    )

    def report(r: FloodResult) -> None:
        refuse = "-" if r.refuse_p50_ms is None else f"{r.refuse_p50_ms:.1f}"
        grown = "-" if r.db_bytes_per_attack is None else f"{r.db_bytes_per_attack:.0f}"
        console.print(
            f"{r.flood:<20}{r.attacks:>8}{r.accepted:>9}{r.refused:>8}{refuse:>14}"
            f"{r.victim_p50_ms_before:>21.2f}{r.victim_p50_ms_during:>8.2f}"
            f"{r.victim_p99_ms_during:>8.2f}{r.victim_failures:>7}{grown:>12}",
            markup=False,
        )
        if r.notes:
            console.print(f"  {r.what}; {r.notes}", markup=False)

    results = bench_floods(
        database=database,
        postgres_url=pg_url,
        floods=chosen,
        victim_reads=victim_reads,
        report=report,
    )
    if json_output:
        sys.stdout.write(as_json(results).decode() + "\n")


@bench_app.command("checkpoints")
def checkpoints(
    database: Annotated[str, typer.Option(help="sqlite or postgres.")] = "sqlite",
    steps: Annotated[int, typer.Option(min=10, help="Steps of the one thread's run.")] = 1000,
    message_bytes: Annotated[
        int, typer.Option(min=1, help="Text of the tool result each step appends.")
    ] = 500,
    snapshot_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="A full checkpoint every N (default: the store's); 1 stores every checkpoint "
            "whole, as before checkpoints were stored as what they add.",
        ),
    ] = None,
    reads: Annotated[int, typer.Option(min=1, help="Timed repetitions of each read.")] = 30,
    postgres_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL server for --database postgres (a fresh database)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print figures as JSON.")] = False,
) -> None:
    """A thread's checkpoints as it grows: bytes per step, and reads at its last step."""
    from nimbus.bench.checkpoints import Mark, as_json, bench_checkpoints
    from nimbus.bench.processes import DEFAULT_POSTGRES_URL, check_postgres

    if database not in ("sqlite", "postgres"):
        raise UserError("--database must be sqlite or postgres")
    pg_url = postgres_url or os.environ.get("NIMBUS_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    if database == "postgres":
        check_postgres(pg_url)
    console = Console(stderr=json_output, highlight=False, width=120)
    console.print(
        f"{'steps':>7}{'DB growth':>14}{'B/step':>10}{'checkpoints':>14}{'values':>14}"
        f"{'write ms':>10}"
    )

    def report(m: Mark) -> None:
        table = "-" if m.checkpoints_bytes is None else f"{m.checkpoints_bytes:,}"
        console.print(
            f"{m.steps:>7,}{m.db_bytes:>14,}{m.db_bytes_per_step:>10,.0f}{table:>14}"
            f"{m.values_bytes:>14,}{m.write_ms:>10.2f}"
        )

    result = bench_checkpoints(
        database=database,
        postgres_url=pg_url,
        steps=steps,
        message_bytes=message_bytes,
        snapshot_every=snapshot_every,
        reads=reads,
        report=report,
    )
    console.print(
        f"{database}, a full checkpoint every {result.snapshot_every}; reads at step "
        f"{steps:,} (median ms): "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in result.reads_ms.items())
    )
    if json_output:
        sys.stdout.write(as_json(result).decode() + "\n")
