"""``nimbus bench server`` with tiny settings: the figures are there and every run was right.

Behaviour only, never speed: speed figures come from running the benchmark itself.
"""

from __future__ import annotations

import orjson

from nimbus.bench.server import (
    EXPECTED_ANSWER,
    CellResult,
    Floor,
    Placement,
    bench_server,
    check_stream,
    default_placement,
)


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
