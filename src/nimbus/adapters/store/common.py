"""Helpers shared by the stores."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Select,
    Table,
    and_,
    func,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from nimbus.records import Run

#: Object keys SQLite's JSON paths can address: printable ASCII without '"' and '\'.
_SQLITE_PATH_KEY = re.compile(r"[ !#-\[\]-~]{1,200}")
_INT64 = 2**63


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def pending_run(
    run_id: str,
    tenant_id: str,
    thread_id: str,
    assistant_id: str,
    kwargs: dict[str, Any],
    metadata: dict[str, Any],
    multitask_strategy: str,
    stamp: datetime,
) -> Run:
    """The row of a newly queued run."""
    return {
        "run_id": run_id,
        "tenant_id": tenant_id,
        "thread_id": thread_id,
        "assistant_id": assistant_id,
        "status": "pending",
        "metadata": metadata,
        "kwargs": kwargs,
        "multitask_strategy": multitask_strategy,
        "state": None,
        "error": None,
        "attempts": 0,
        "created_at": stamp,
        "updated_at": stamp,
        "lease_owner": None,
        "lease_token": 0,
    }


def insert_new(dialect: str, table: Table) -> Insert:
    """An insert into ``table`` that skips a row whose key exists (``rowcount`` 0), instead of
    failing: of concurrent creates of one id, one inserts and the others find its row (on
    PostgreSQL the others wait for the first to commit), where a read-then-insert let two
    pass the read and one fail on the key (a 500)."""
    insert = pg_insert(table) if dialect == "postgresql" else sqlite_insert(table)
    return insert.on_conflict_do_nothing()


def row(mapping: RowMapping | None) -> dict[str, Any] | None:
    """A row as a plain dict with timestamps made timezone-aware."""
    if mapping is None:
        return None
    out = dict(mapping)
    for key, value in out.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            out[key] = value.replace(tzinfo=UTC)
    return out


def same(a: Any, b: Any) -> bool:
    """JSON equality: like ``==`` but ``true`` is not ``1`` (as in SQL on JSON)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return False
    return bool(a == b)


def matches(document: dict[str, Any] | None, wanted: dict[str, Any] | None) -> bool:
    """Whether ``document`` holds every key/value of ``wanted`` (nested values compared whole)."""
    found = document if isinstance(document, dict) else {}
    return all(key in found and same(found[key], value) for key, value in (wanted or {}).items())


class JsonMatch:
    """Filters "this JSON column holds these key/values", pushed into SQL where SQL decides
    them exactly, finished in Python otherwise (odd keys, nested values, huge numbers).

    :meth:`page` and :meth:`count` paginate in SQL only when the SQL is exact, so a page is
    never short because rows were dropped after the ``LIMIT``.
    """

    def __init__(self, dialect: str, *filters: tuple[Column[Any], dict[str, Any] | None]) -> None:
        self.filters = [(column, wanted) for column, wanted in filters if wanted]
        self.conditions: list[ColumnElement[bool]] = []
        self.exact = True
        for column, wanted in self.filters:
            condition, exact = _json_condition(column, wanted, dialect)
            self.conditions.append(condition)
            self.exact = self.exact and exact

    def where(self, query: Select[Any]) -> Select[Any]:
        """``query`` with the SQL part of the filters."""
        return query.where(*self.conditions) if self.conditions else query

    def keep(self, found: dict[str, Any]) -> bool:
        """Whether a fetched row passes every filter."""
        return all(matches(found.get(column.name), wanted) for column, wanted in self.filters)

    async def page(
        self, conn: AsyncConnection, query: Select[Any], limit: int, offset: int
    ) -> list[dict[str, Any]]:
        """Rows of ``query`` (ordered) passing the filters, ``offset`` then ``limit``."""
        query = self.where(query)
        if self.exact:
            rows = (await conn.execute(query.limit(limit).offset(offset))).mappings().all()
            return [r for r in map(row, rows) if r]
        rows = (await conn.execute(query)).mappings().all()
        kept = [r for r in map(row, rows) if r and self.keep(r)]
        return kept[offset : offset + limit]

    async def count(self, conn: AsyncConnection, query: Select[Any]) -> int:
        """How many rows of ``query`` pass the filters."""
        query = self.where(query)
        if self.exact:
            return int(await conn.scalar(select(func.count()).select_from(query.subquery())) or 0)
        rows = (await conn.execute(query)).mappings().all()
        return sum(1 for r in map(row, rows) if r and self.keep(r))


def _json_condition(
    column: Column[Any], wanted: dict[str, Any], dialect: str
) -> tuple[ColumnElement[bool], bool]:
    if dialect == "postgresql":
        # jsonb @> is type-aware; for nested values it means "contains", looser than equality.
        nested = any(isinstance(v, dict | list) for v in wanted.values())
        return type_coerce(column, JSONB).contains(wanted), not nested
    conditions, exact = [], True
    for key, value in wanted.items():
        condition = _sqlite_eq(column, key, value)
        if condition is None:
            exact = False
        else:
            conditions.append(condition)
    return and_(true(), *conditions), exact


def _sqlite_eq(column: Column[Any], key: str, value: Any) -> ColumnElement[bool] | None:
    """SQLite SQL for ``column[key] == value`` (type-aware), or None if SQL cannot say it."""
    if not _SQLITE_PATH_KEY.fullmatch(key):
        return None
    path = f'$."{key}"'
    kind = func.json_type(column, path)
    extracted = func.json_extract(column, path)
    if value is None:
        return kind == "null"
    if isinstance(value, bool):
        return kind == ("true" if value else "false")
    if isinstance(value, int) and -_INT64 <= value < _INT64:
        return and_(kind.in_(("integer", "real")), extracted == value)
    if isinstance(value, float):
        return and_(kind.in_(("integer", "real")), extracted == value)
    if isinstance(value, str):
        return and_(kind == "text", extracted == value)
    return None
