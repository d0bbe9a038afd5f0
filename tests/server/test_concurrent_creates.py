"""Concurrent creates of one id, against a live server on SQLite and PostgreSQL: exactly one
creates it; the others get the existing row (``if_exists=do_nothing``) or a 409 (``raise``),
never a 500. (Before, on PostgreSQL, two requests could both find the id free and the second
insert failed on the key: a 500.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.server.test_hardening import ASK, CALC, serving

N = 20


async def _all(api: httpx.AsyncClient, path: str, body: dict[str, object]) -> list[httpx.Response]:
    return list(await asyncio.gather(*(api.post(path, json=body) for _ in range(N))))


async def test_concurrent_creates_of_one_id(database_url: str, tmp_path: Path) -> None:
    async with serving(database_url, tmp_path) as (_, api):
        for path, field, extra in (
            ("/assistants", "assistant_id", {"graph_id": "agent", "config": CALC}),
            ("/threads", "thread_id", {}),
        ):
            for round_ in range(3):  # the race is a matter of timing: try it a few times
                ident = f"same-{field}-{round_}"
                answers = await _all(api, path, {**extra, field: ident, "if_exists": "do_nothing"})
                assert [r.status_code for r in answers] == [200] * N, [r.text for r in answers]
                assert {r.json()[field] for r in answers} == {ident}
                assert len({r.json()["created_at"] for r in answers}) == 1  # one row for all

                ident = f"raise-{field}-{round_}"
                answers = await _all(api, path, {**extra, field: ident, "if_exists": "raise"})
                statuses = sorted(r.status_code for r in answers)
                assert statuses == [200] + [409] * (N - 1), [r.text for r in answers]


async def test_concurrent_runs_creating_one_thread(database_url: str, tmp_path: Path) -> None:
    async with serving(database_url, tmp_path) as (_, api):
        a = (await api.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
        body = {
            "assistant_id": a["assistant_id"],
            "input": ASK,
            "if_not_exists": "create",
            "multitask_strategy": "enqueue",
        }
        answers = await _all(api, "/threads/made-by-runs/runs", body)
        assert [r.status_code for r in answers] == [200] * N, [r.text for r in answers]
        runs = (await api.get("/threads/made-by-runs/runs", params={"limit": 100})).json()
        assert len(runs) == N
