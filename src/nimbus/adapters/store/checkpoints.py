"""Reading checkpoints back: a chain of appends rebuilt from its nearest full row.

How they are stored (``full`` or ``append``, ``seq``, :data:`SNAPSHOT_EVERY`) is the rule
of :mod:`nimbus.service.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from nimbus.adapters.store.schema import checkpoints

#: A stored checkpoint as reading needs it: (parent id, kind, values as stored).
Stored = tuple[str | None, str, Any]


def rebuild(stored: Mapping[str, Stored], wanted: Iterable[str]) -> dict[str, Any]:
    """The values of each ``wanted`` checkpoint, from the ``stored`` rows of its chain back
    to a full one. Each chain is followed back once and rebuilt forward once, however many
    of its checkpoints are wanted."""
    done: dict[str, Any] = {}
    for checkpoint_id in wanted:
        path: list[str] = []
        at: str | None = checkpoint_id
        while at not in done:
            if at is None or at not in stored:
                raise LookupError(f"checkpoint {checkpoint_id}: its chain breaks at {at!r}")
            parent, kind, values = stored[at]
            if kind == "full":
                done[at] = values
                break
            path.append(at)
            at = parent
        for appending in reversed(path):
            base = done[at]
            done[appending] = {"messages": [*base["messages"], *stored[appending][2]["messages"]]}
            at = appending
    return done


def _chains() -> Select[Any]:
    """The rows of ``starts`` (checkpoints of one thread) and of their ancestors back to the
    nearest full ones: at most :data:`SNAPSHOT_EVERY` key lookups per chain (``UNION``
    visits a shared ancestor once).

    Rows are looked up by key alone, their tenant and thread checked once found: a condition
    on the thread in the lookups let PostgreSQL read each link through the thread's index,
    every checkpoint of the thread at every link (on a table not analyzed yet, a thread looks
    like one row)."""
    c = checkpoints
    link = (
        select(c.c.checkpoint_id, c.c.parent_id, c.c.kind, c.c.tenant_id, c.c.thread_id)
        .where(c.c.checkpoint_id.in_(bindparam("starts", expanding=True)))
        .cte("chain", recursive=True)
    )
    up = (
        select(c.c.checkpoint_id, c.c.parent_id, c.c.kind, c.c.tenant_id, c.c.thread_id)
        .join(link, c.c.checkpoint_id == link.c.parent_id)
        .where(link.c.kind == "append")
    )
    link = link.union(up)
    return (
        select(c.c.checkpoint_id, c.c.parent_id, c.c.kind, c.c["values"])
        .select_from(link.join(c, c.c.checkpoint_id == link.c.checkpoint_id))
        .where(
            link.c.tenant_id == bindparam("tenant_id"), link.c.thread_id == bindparam("thread_id")
        )
    )


_CHAINS = _chains()  # built once: building it costs more than running it on SQLite


async def complete(
    conn: AsyncConnection, tenant_id: str, thread_id: str, rows: list[dict[str, Any]]
) -> None:
    """Give each checkpoint row of a thread its values whole, reading what its chain needs
    in one statement, and drop the storage columns (``kind``, ``seq``)."""
    stored: dict[str, Stored] = {
        r["checkpoint_id"]: (r["parent_id"], r["kind"], r["values"]) for r in rows
    }
    starts = {
        r["parent_id"]
        for r in rows
        if r["kind"] == "append" and r["parent_id"] is not None and r["parent_id"] not in stored
    }
    if starts:
        found_rows = await conn.execute(
            _CHAINS, {"tenant_id": tenant_id, "thread_id": thread_id, "starts": list(starts)}
        )
        for found in found_rows:
            stored.setdefault(found[0], (found[1], found[2], found[3]))
    values = rebuild(stored, [r["checkpoint_id"] for r in rows if r["kind"] == "append"])
    for r in rows:
        if r["kind"] == "append":
            r["values"] = values[r["checkpoint_id"]]
        del r["kind"], r["seq"]
