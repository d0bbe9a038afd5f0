"""Checkpoints stored as what they add (see nimbus.adapters.store.checkpoints), on SQLite and on
PostgreSQL: every checkpoint reads back as the values written, a replaced message makes a
full one, history pages and copies see whole values, and storage grows linearly."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from sqlalchemy import inspect, select, text

from nimbus.adapters.store.database import Database
from nimbus.adapters.store.engine import MIGRATIONS
from nimbus.adapters.store.schema import checkpoints
from nimbus.adapters.store.threads import ThreadStore
from nimbus.records import StepWrite, load_json
from nimbus.service import checkpoints as scheme
from nimbus.service.checkpoints import CheckpointChain
from tests.store.conftest import new_assistant

TENANT = "t1"
K = scheme.SNAPSHOT_EVERY


def _message(n: int, size: int = 80) -> dict[str, Any]:
    """A message in LangGraph shape, as a run's values hold it."""
    return {
        "type": "tool",
        "content": f"result {n} " + "x" * size,
        "id": f"m-{n}",
        "tool_call_id": f"call-{n}",
        "name": "calc",
        "status": "success",
        "additional_kwargs": {},
        "response_metadata": {"n": n, "nested": {"b": 1, "a": 2.5}},
    }


class Writer:
    """Writes a thread's checkpoints as a run does (claimed run, group-committed steps, a
    :class:`CheckpointChain` from the thread's row) and keeps the values of each one: the
    reference its reads must equal."""

    def __init__(self, db: Database, thread_id: str) -> None:
        self.db, self.thread_id = db, thread_id
        self.expected: dict[str, dict[str, Any]] = {}  #: checkpoint id → values written
        self.order: list[str] = []  #: checkpoint ids, oldest first
        self.messages: list[dict[str, Any]] = []  #: the thread's messages now
        self.run: dict[str, Any] = {}
        self.chain = CheckpointChain(None, None)
        self.step = 0

    @classmethod
    async def new(cls, db: Database) -> Writer:
        thread, _ = await db.threads.create(TENANT, thread_id=None, metadata={})
        return cls(db, thread["thread_id"])

    async def start_run(self) -> None:
        """Queue and claim a run; its chain starts at the thread's checkpoint, as read."""
        queued = await self.db.runs.create(
            TENANT,
            thread_id=self.thread_id,
            assistant_id=await new_assistant(self.db, TENANT),
            kwargs={},
            metadata={},
            multitask_strategy="enqueue",
        )
        assert queued is not None
        run = queued.run
        claimed = await self.db.runs.claim(run["run_id"], "test-worker")
        assert claimed is not None and claimed[1] is not None
        self.run = claimed[0]
        thread = claimed[1]
        if thread.get("values") is None:  # a claim that does not return the thread's values
            thread = await self.db.threads.get(TENANT, self.thread_id) or {}
        self.chain = CheckpointChain(thread["checkpoint_id"], thread["values"])

    def write(self, *new: dict[str, Any], end: bool = False) -> StepWrite:
        """The next step's write: the thread's messages with ``new`` appended."""
        self.step += 1
        self.messages.extend(new)
        write = StepWrite(
            TENANT,
            self.run["run_id"],
            self.thread_id,
            orjson.Fragment(b"{}"),
            step=self.step,
            lease_token=self.run.get("lease_token") or 0,
            end=("success", None, "idle") if end else None,
        )
        values = {"messages": list(self.messages)}
        self.chain.extend(write, values)
        self.expected[write.checkpoint_id] = values
        self.order.append(write.checkpoint_id)
        return write

    async def steps(self, count: int, *, end: bool = True) -> None:
        """``count`` steps of one run, each appending a message, written one by one."""
        await self.start_run()
        for n in range(count):
            last = end and n == count - 1
            await self.db.steps.write(self.write(_message(len(self.messages)), end=last))

    async def update_state(self, messages: list[dict[str, Any]]) -> str:
        """A state update through the API's path: the thread's messages become ``messages``."""
        self.messages = list(messages)
        values = {"messages": list(messages)}
        async with self.db.engine.begin() as conn:
            checkpoint_id = await ThreadStore.save_checkpoint(
                conn,
                TENANT,
                self.thread_id,
                values=values,
                metadata={"source": "update"},
                step=-1,
                run_id=None,
                next_nodes=[],
            )
        self.expected[checkpoint_id] = values
        self.order.append(checkpoint_id)
        return checkpoint_id

    async def stored(self) -> list[dict[str, Any]]:
        """The thread's checkpoint rows as stored, oldest first."""
        async with self.db.engine.connect() as conn:
            found = await conn.execute(
                select(
                    checkpoints.c.checkpoint_id,
                    checkpoints.c.parent_id,
                    checkpoints.c.kind,
                    checkpoints.c.seq,
                )
                .where(checkpoints.c.thread_id == self.thread_id)
                .order_by(checkpoints.c.created_at)
            )
            return [dict(r) for r in found.mappings()]

    async def stored_bytes(self) -> int:
        """The bytes of the ``values`` column of the thread's checkpoints."""
        size = (
            'octet_length("values"::text)'
            if self.db.engine.dialect.name == "postgresql"
            else 'length(CAST("values" AS BLOB))'
        )
        async with self.db.engine.connect() as conn:
            total = await conn.scalar(
                text(f"SELECT sum({size}) FROM checkpoints WHERE thread_id = :t"),
                {"t": self.thread_id},
            )
        return int(total or 0)


def _json(values: Any) -> bytes:
    return orjson.dumps(values)


async def _check_every_checkpoint(writer: Writer) -> None:
    for checkpoint_id, values in writer.expected.items():
        found = await writer.db.threads.checkpoint(TENANT, writer.thread_id, checkpoint_id)
        assert found is not None
        assert _json(found["values"]) == _json(values), checkpoint_id
        assert "kind" not in found and "seq" not in found


async def test_a_long_chain_reads_back_at_every_checkpoint(db: Database) -> None:
    writer = await Writer.new(db)
    await writer.steps(K + 5)
    # a state update replacing a message in the middle: stored whole
    changed = list(writer.messages)
    changed[7] = {**changed[7], "content": "replaced"}
    replaced = await writer.update_state(changed)
    # a state update that only appends: stored as what it adds
    added = await writer.update_state([*writer.messages, _message(10_000)])
    await writer.steps(K + 10)  # a second run, from the thread as its claim read it
    assert len(writer.order) > 2 * K

    await _check_every_checkpoint(writer)
    rows = await writer.stored()
    assert [r["checkpoint_id"] for r in rows] == writer.order
    kinds = {r["checkpoint_id"]: r["kind"] for r in rows}
    assert kinds[writer.order[0]] == "full"  # the thread's first
    assert kinds[replaced] == "full" and kinds[added] == "append"
    assert all(r["seq"] == n for n, r in enumerate(rows))  # one chain, numbered in order
    assert all(r["kind"] == "full" for r in rows if r["seq"] % K == 0)
    assert sum(r["kind"] == "append" for r in rows) == len(rows) - 4  # seq 0, K, 2K; replaced
    thread = await db.threads.get(TENANT, writer.thread_id)
    assert thread is not None and thread["values"] == {"messages": writer.messages}


async def test_history_pages_with_before(db: Database) -> None:
    writer = await Writer.new(db)
    await writer.steps(2 * K + 9)
    newest_first = writer.order[::-1]
    seen: list[str] = []
    before: str | None = None
    while True:
        page = await db.threads.history(TENANT, writer.thread_id, limit=7, before=before)
        if not page:
            break
        for found in page:
            assert _json(found["values"]) == _json(writer.expected[found["checkpoint_id"]])
            assert "kind" not in found and "seq" not in found
        seen += [found["checkpoint_id"] for found in page]
        before = page[-1]["checkpoint_id"]
    assert seen == newest_first
    # a metadata filter leaves holes in the chain: each checkpoint is still whole
    odd = await db.threads.history(TENANT, writer.thread_id, limit=1000, metadata={"step": 3})
    assert [found["checkpoint_id"] for found in odd] == [writer.order[2]]
    assert _json(odd[0]["values"]) == _json(writer.expected[writer.order[2]])


async def test_steps_of_one_run_in_one_batch(db: Database) -> None:
    writer = await Writer.new(db)
    await writer.steps(3, end=False)
    before = db.steps.batches
    writes = [writer.write(_message(100 + n)) for n in range(6)]
    await asyncio.gather(*(db.steps.submit(w) for w in writes))
    assert db.steps.batches - before < len(writes)  # parents written in the same batch
    rows = await writer.stored()
    assert [r["kind"] for r in rows] == ["full"] + ["append"] * 8
    await _check_every_checkpoint(writer)


async def test_a_checkpoint_after_a_lost_write_is_stored_whole(db: Database) -> None:
    writer = await Writer.new(db)
    await writer.steps(3, end=False)
    lost = writer.write(_message(50))  # never written: its child's parent is not stored
    del writer.expected[lost.checkpoint_id]
    writer.order.remove(lost.checkpoint_id)
    await db.steps.write(writer.write(_message(51)))
    await db.steps.write(writer.write(_message(52)))
    kinds = [r["kind"] for r in await writer.stored()]
    assert kinds == ["full", "append", "append", "full", "append"]
    await _check_every_checkpoint(writer)


async def test_a_copy_keeps_every_checkpoint(db: Database) -> None:
    writer = await Writer.new(db)
    await writer.steps(K + 3)
    copy = await db.threads.copy(TENANT, writer.thread_id)
    assert copy is not None
    source = await db.threads.history(TENANT, writer.thread_id, limit=1000)
    copied = await db.threads.history(TENANT, copy["thread_id"], limit=1000)
    assert [_json(h["values"]) for h in copied] == [_json(h["values"]) for h in source]
    assert {h["checkpoint_id"] for h in copied}.isdisjoint(h["checkpoint_id"] for h in source)
    assert copied[0]["checkpoint_id"] == copy["checkpoint_id"]
    for found in copied[::5]:
        one = await db.threads.checkpoint(TENANT, copy["thread_id"], found["checkpoint_id"])
        assert one is not None and _json(one["values"]) == _json(found["values"])
    # the copy goes on from its own checkpoint, as a new run on it would
    other = Writer(db, copy["thread_id"])
    other.messages = list(writer.messages)
    await other.steps(3)
    await _check_every_checkpoint(other)


async def test_storage_grows_linearly(db: Database) -> None:
    """200 steps of one message each: stored whole, the checkpoints would hold
    1 + 2 + ... + 200 messages (100 times the thread's final values); stored as what
    they add, the 200 messages plus a full checkpoint every K."""
    writer = await Writer.new(db)
    await writer.steps(200)
    final = len(_json({"messages": writer.messages}))
    stored = await writer.stored_bytes()
    # appends: the 200 messages once (about 1 x final); full ones at seq 0, K, 2K...: at
    # most 200 / K + 1 of them, none larger than the final values
    assert stored < final * (1.2 + 200 / K + 1)
    assert stored < final * 8  # quadratic storage is ~100 x final
    await _check_every_checkpoint(writer)


async def test_rows_from_before_stay_whole_and_chains_go_on_from_them(db: Database) -> None:
    """Rows of revision 0008 (no kind given: full; no seq) read as they are, and a chain
    written after one counts from 0."""
    writer = await Writer.new(db)
    stamp = (await db.threads.get(TENANT, writer.thread_id) or {})["created_at"]
    legacy = "legacy-1"
    writer.messages = [_message(0)]
    values = {"messages": list(writer.messages)}
    async with db.engine.begin() as conn:
        await conn.execute(
            checkpoints.insert().values(
                checkpoint_id=legacy,
                tenant_id=TENANT,
                thread_id=writer.thread_id,
                parent_id=None,
                run_id=None,
                step=0,
                values=values,
                metadata={},
                next=[],
                created_at=stamp,
            )
        )
        await conn.execute(
            text('UPDATE threads SET "values" = :v, checkpoint_id = :c WHERE thread_id = :t'),
            {"v": orjson.dumps(values).decode(), "c": legacy, "t": writer.thread_id},
        )
    writer.expected[legacy] = values
    writer.order.append(legacy)
    await writer.steps(3)
    rows = await writer.stored()
    assert [(r["kind"], r["seq"]) for r in rows] == [
        ("full", None),
        ("full", 0),
        ("append", 1),
        ("append", 2),
    ]
    await _check_every_checkpoint(writer)


def _downgrade(connection: Any, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def test_a_downgrade_writes_appends_out_whole(db: Database) -> None:
    writer = await Writer.new(db)
    await writer.steps(K + 3)
    async with db.engine.begin() as conn:
        await conn.run_sync(_downgrade, "0008")
    async with db.engine.connect() as conn:
        columns = await conn.run_sync(
            lambda c: {col["name"] for col in inspect(c).get_columns("checkpoints")}
        )
        found = await conn.execute(
            text('SELECT checkpoint_id, "values" FROM checkpoints WHERE thread_id = :t'),
            {"t": writer.thread_id},
        )
        stored = {r[0]: r[1] if isinstance(r[1], dict) else load_json(r[1]) for r in found}
    assert "kind" not in columns and "seq" not in columns
    assert {k: _json(v) for k, v in stored.items()} == {
        k: _json(v) for k, v in writer.expected.items()
    }
