"""Idempotency-Key on run creation, against a live server on SQLite and PostgreSQL: the same
key and request give one run, another request with the key is a 409, keys are per tenant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.server.conftest import LiveServer

CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
ASK = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}


@pytest.fixture
async def api(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.url, headers={"x-api-key": server.admin_key}, timeout=30
    ) as client:
        yield client


async def _setup(api: httpx.AsyncClient) -> tuple[str, str]:
    assistant = (await api.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
    thread = (await api.post("/threads", json={})).json()
    return assistant["assistant_id"], thread["thread_id"]


async def test_same_key_same_request_is_one_run(api: httpx.AsyncClient) -> None:
    assistant, thread = await _setup(api)
    body = {"assistant_id": assistant, "input": ASK, "multitask_strategy": "enqueue"}
    key = {"Idempotency-Key": "order-1"}
    first = await api.post(f"/threads/{thread}/runs", json=body, headers=key)
    assert first.status_code == 200, first.text
    # retried at once, while the run is going, and again once it has ended
    again = await api.post(f"/threads/{thread}/runs", json=body, headers=key)
    assert again.json()["run_id"] == first.json()["run_id"]
    await api.get(f"/threads/{thread}/runs/{first.json()['run_id']}/join")
    waited = await api.post(f"/threads/{thread}/runs/wait", json=body, headers=key)
    assert waited.json()["messages"][-1]["content"] == "The result is 42."
    runs = (await api.get(f"/threads/{thread}/runs")).json()
    assert [r["run_id"] for r in runs] == [first.json()["run_id"]]
    assert len(waited.json()["messages"]) == 4  # the one run's messages, not two runs'


async def test_concurrent_duplicates_make_one_run(api: httpx.AsyncClient) -> None:
    assistant, thread = await _setup(api)
    body = {"assistant_id": assistant, "input": ASK, "multitask_strategy": "enqueue"}
    answers = await asyncio.gather(
        *(
            api.post(f"/threads/{thread}/runs", json=body, headers={"Idempotency-Key": "dup"})
            for _ in range(8)
        )
    )
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["run_id"] for a in answers}) == 1
    assert len((await api.get(f"/threads/{thread}/runs")).json()) == 1


async def test_same_key_another_request_is_409(api: httpx.AsyncClient) -> None:
    assistant, thread = await _setup(api)
    key = {"Idempotency-Key": "k-2"}
    body = {"assistant_id": assistant, "input": ASK}
    assert (await api.post(f"/threads/{thread}/runs/wait", json=body, headers=key)).is_success
    other = {"assistant_id": assistant, "input": {"messages": [{"role": "user", "content": "2+2"}]}}
    clash = await api.post(f"/threads/{thread}/runs", json=other, headers=key)
    assert clash.status_code == 409
    assert "Idempotency-Key" in clash.json()["detail"]
    elsewhere = (await api.post("/threads", json={})).json()["thread_id"]
    moved = await api.post(f"/threads/{elsewhere}/runs", json=body, headers=key)
    assert moved.status_code == 409  # the same body on another thread is another request
    too_long = await api.post(
        f"/threads/{thread}/runs", json=body, headers={"Idempotency-Key": "x" * 201}
    )
    assert too_long.status_code == 422


async def test_a_replayed_stream_is_the_same_run(api: httpx.AsyncClient) -> None:
    assistant, thread = await _setup(api)
    body = {"assistant_id": assistant, "input": ASK, "stream_mode": ["values"]}
    key = {"Idempotency-Key": "stream-1"}
    first = await api.post(f"/threads/{thread}/runs/stream", json=body, headers=key)
    second = await api.post(f"/threads/{thread}/runs/stream", json=body, headers=key)
    assert first.status_code == second.status_code == 200
    assert second.text == first.text  # the stored events of the one run, replayed
    assert len((await api.get(f"/threads/{thread}/runs")).json()) == 1


async def test_keys_are_per_tenant(server: LiveServer, api: httpx.AsyncClient) -> None:
    made = await api.post("/admin/keys", json={"tenant_id": "t2", "scope": "read-write"})
    async with httpx.AsyncClient(
        base_url=server.url, headers={"x-api-key": made.json()["key"]}, timeout=30
    ) as other:
        mine, theirs = await _setup(api), await _setup(other)
        key = {"Idempotency-Key": "shared"}
        a = await api.post(f"/threads/{mine[1]}/runs", json={"assistant_id": mine[0]}, headers=key)
        b = await other.post(
            f"/threads/{theirs[1]}/runs", json={"assistant_id": theirs[0]}, headers=key
        )
        assert a.status_code == b.status_code == 200
        assert a.json()["run_id"] != b.json()["run_id"]
