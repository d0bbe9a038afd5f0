"""While PostgreSQL is down the API answers 503 with Retry-After (never a 500), /ok reports
not ready, and both recover by themselves once it is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.postgres import Cluster
from tests.server.conftest import live_server


async def test_api_answers_503_while_postgres_is_down_then_recovers(tmp_path: Path) -> None:
    cluster = Cluster()
    try:
        cluster.start()
        async with (
            FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake,
            live_server(cluster.url, fake, tmp_path) as live,
            httpx.AsyncClient(
                base_url=live.url, headers={"x-api-key": live.admin_key}, timeout=30
            ) as api,
        ):
            thread = (await api.post("/threads", json={})).json()["thread_id"]
            cluster.stop()  # as a crash: connections drop at once
            for method, path, body in (
                ("GET", "/ok", None),
                ("POST", "/threads", {}),
                ("GET", f"/threads/{thread}", None),
                ("POST", "/threads/search", {}),
                ("POST", "/assistants/search", {}),
            ):
                r = await api.request(method, path, json=body)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["Retry-After"] == "5"
                assert r.json()["detail"]
            cluster.start()
            deadline = time.monotonic() + 30
            while (await api.get("/ok")).status_code != 200:
                assert time.monotonic() < deadline, "the server did not recover"
                await asyncio.sleep(0.2)
            for _ in range(3):  # every pooled connection was replaced, not just one
                made = await api.post("/threads", json={})
                assert made.status_code == 200, made.text
            assert (await api.get(f"/threads/{thread}")).status_code == 200
            assert "Traceback" not in live.logs()
    finally:
        cluster.remove()
