"""A bounded load test on real processes: 2 API replicas and 2 workers on one PostgreSQL, a
fake model answering in 1 s, and clients mixing reads, background runs and streamed runs for
``NIMBUS_LOAD_TEST_S`` seconds (default 90) → no error, no run lost."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server.cluster import agent, deployment
from tests.server.conftest import ADMIN_KEY

DURATION_S = float(os.environ.get("NIMBUS_LOAD_TEST_S", "90"))
CLIENTS = 24


async def test_two_apis_two_workers_under_mixed_load(postgres_url: str, tmp_path: Path) -> None:
    async with deployment(postgres_url, tmp_path, latency=1.0) as d:
        apis = [await d.api(), await d.api()]
        await d.worker(concurrency=64)
        await d.worker(concurrency=64)
        headers = {"x-api-key": ADMIN_KEY}
        errors: list[str] = []
        created: list[str] = []
        streamed: list[int] = []
        reads = 0
        async with httpx.AsyncClient(headers=headers, timeout=60) as http:
            made = await http.post(
                f"{apis[0].url}/assistants",
                json={"graph_id": "agent", "config": agent("calculator")},
            )
            assistant = made.json()["assistant_id"]
            threads = [
                (await http.post(f"{apis[0].url}/threads", json={})).json()["thread_id"]
                for _ in range(CLIENTS)
            ]
            stop_at = time.monotonic() + DURATION_S

            def check(r: httpx.Response, what: str) -> Any:
                if r.status_code >= 300:
                    errors.append(f"{what}: {r.status_code} {r.text[:200]}")
                    return None
                return r.json()

            async def client(i: int) -> None:
                nonlocal reads
                rng = random.Random(i)
                thread = threads[i]
                while time.monotonic() < stop_at:
                    api = apis[rng.randrange(2)].url
                    roll = rng.random()
                    body = {
                        "assistant_id": assistant,
                        "input": {"messages": [{"role": "user", "content": f"c{i}"}]},
                        "multitask_strategy": "enqueue",
                    }
                    if roll < 0.35:  # a streamed run
                        body["stream_mode"] = ["values", "messages-tuple"]
                        last = None
                        async with http.stream(
                            "POST", f"{api}/threads/{thread}/runs/stream", json=body
                        ) as r:
                            if r.status_code != 200:
                                errors.append(f"stream: {r.status_code}")
                                continue
                            async for line in r.aiter_lines():
                                if line.startswith("data: "):
                                    last = line[6:]
                        values = json.loads(last or "{}")
                        if values.get("messages", [{}])[-1].get("content") != "The result is 42.":
                            errors.append(f"stream ended with {last!r:.200}")
                        streamed.append(i)
                    elif roll < 0.55:  # a run in the background, joined from the other replica
                        run = check(
                            await http.post(f"{api}/threads/{thread}/runs", json=body), "run"
                        )
                        if run is None:
                            continue
                        created.append(run["run_id"])
                        other = apis[rng.randrange(2)].url
                        check(
                            await http.get(f"{other}/threads/{thread}/runs/{run['run_id']}/join"),
                            "join",
                        )
                    else:  # reads
                        for path in (
                            f"/threads/{thread}",
                            f"/threads/{thread}/state",
                            f"/threads/{thread}/runs?limit=5",
                            "/info",
                        ):
                            check(await http.get(api + path), path)
                        check(await http.post(f"{api}/threads/search", json={"limit": 5}), "search")
                        reads += 5
                        await asyncio.sleep(0.2)

            await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        rows = await d.sql("SELECT status, count(*) AS n FROM runs GROUP BY status")
        counts = {r["status"]: r["n"] for r in rows}
    assert errors == []
    assert counts == {"success": len(created) + len(streamed)}  # every run ended well
    assert len(streamed) > 20 and len(created) > 10 and reads > 500
    assert "Traceback" not in d.logs()
