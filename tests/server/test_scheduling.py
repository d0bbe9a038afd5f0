"""Fair scheduling across tenants in the worker pool: per-tenant caps on running and queued
runs, and one tenant's backlog never holds back another tenant's run."""

from __future__ import annotations

from pathlib import Path

import httpx

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import live_server

CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
ASK = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}


async def _setup(api: httpx.AsyncClient) -> str:
    made = await api.post("/assistants", json={"graph_id": "agent", "config": CALC})
    return str(made.json()["assistant_id"])


async def test_a_tenants_backlog_does_not_hold_back_another_tenant(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}', latency=0.3) as fake,
        live_server(
            database_url,
            fake,
            tmp_path,
            NIMBUS_TENANT_MAX_RUNNING="1",
            NIMBUS_TENANT_MAX_QUEUED="2",
        ) as live,
        httpx.AsyncClient(
            base_url=live.url, headers={"x-api-key": live.admin_key}, timeout=30
        ) as a,
    ):
        key = await a.post("/admin/keys", json={"tenant_id": "t2", "scope": "read-write"})
        async with httpx.AsyncClient(
            base_url=live.url, headers={"x-api-key": key.json()["key"]}, timeout=30
        ) as b:
            a_assistant, b_assistant = await _setup(a), await _setup(b)
            a_runs = []
            for _ in range(3):  # one runs, two wait (A may run one at a time)
                made = await a.post("/runs", json={"assistant_id": a_assistant, "input": ASK})
                assert made.status_code == 200, made.text
                a_runs.append(made.json())
            over = await a.post("/runs", json={"assistant_id": a_assistant, "input": ASK})
            assert over.status_code == 429  # a third waiting run is over A's cap
            assert over.headers["Retry-After"] and over.json()["detail"]
            # B's run starts at once, in a slot of its own, and ends before A's backlog does
            b_made = await b.post("/runs/wait", json={"assistant_id": b_assistant, "input": ASK})
            assert b_made.json()["messages"][-1]["content"] == "The result is 42."
            statuses = [(await a.get(f"/runs/{r['run_id']}")).json()["status"] for r in a_runs]
            assert statuses[-1] == "pending", statuses  # still waiting behind A's own runs
            assert statuses.count("running") <= 1
            # and A's runs all finish, one after another
            for run in a_runs:
                await a.get(f"/threads/{run['thread_id']}/runs/{run['run_id']}/join")
            done = [(await a.get(f"/runs/{r['run_id']}")).json()["status"] for r in a_runs]
            assert done == ["success"] * 3
            now_free = await a.post("/runs", json={"assistant_id": a_assistant, "input": ASK})
            assert now_free.status_code == 200
