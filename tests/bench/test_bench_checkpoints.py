"""``nimbus bench checkpoints`` with tiny settings: it writes the thread, measures it at each
mark and reads it. Behaviour only, never speed."""

from __future__ import annotations

from nimbus.bench.checkpoints import CheckpointsResult, bench_checkpoints
from nimbus.service import checkpoints


def _bench(snapshot_every: int) -> CheckpointsResult:
    return bench_checkpoints(
        database="sqlite", postgres_url="", steps=30, reads=1, snapshot_every=snapshot_every
    )


def test_a_thread_is_measured_at_each_mark_and_read() -> None:
    appends, whole = _bench(8), _bench(1)
    assert checkpoints.SNAPSHOT_EVERY not in (1, 8)  # the store's own rule is back
    for result in (appends, whole):
        assert [m.steps for m in result.marks] == [10, 30]
        assert all(m.db_bytes > 0 and m.values_bytes > 0 for m in result.marks)
        assert set(result.reads_ms) == {
            "state",
            "state_at_newest",
            "state_at_worst",
            "history",
            "history_middle",
        }
    assert appends.marks[-1].values_bytes * 2 < whole.marks[-1].values_bytes
