"""Tenants and API keys against a live server, on SQLite and PostgreSQL.

Tenant A is the operator (``server.admin_key``, tenant ``default``); tenant B (``t2``) gets a
read-write key from ``POST /admin/keys``. B must find every one of A's ids exactly as missing
as a made-up id, for every endpoint family; keys are checked (401), scoped (403), revocable,
never logged and stored only as hashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.server.conftest import LiveServer, live_server

CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
ASK = {"messages": [{"role": "user", "content": "What is 6 times 7?"}]}
UPSTREAM_KEY = "sk-upstream-secret"


@dataclass
class World:
    """Tenant A's resources, tenant B's own ones, and a client per key."""

    a: httpx.AsyncClient
    b: httpx.AsyncClient
    anon: httpx.AsyncClient
    ids: dict[str, str]  # A's ids: a (assistant), t (thread), r (run), c (checkpoint)
    b_ids: dict[str, str]  # B's own: ba (assistant), bt (thread)
    keys: list[str]


def client(server: LiveServer, key: str | None = None, **headers: str) -> httpx.AsyncClient:
    """An httpx client for ``server``, authenticated with ``key`` in ``x-api-key``."""
    if key is not None:
        headers["x-api-key"] = key
    return httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30)


async def new_key(admin: httpx.AsyncClient, tenant: str, scope: str) -> dict[str, Any]:
    """A fresh key (and its description) made through ``POST /admin/keys``."""
    r = await admin.post("/admin/keys", json={"tenant_id": tenant, "scope": scope})
    assert r.status_code == 200, r.text
    created: dict[str, Any] = r.json()
    assert created["key"] and created["tenant_id"] == tenant and created["scope"] == scope
    return created


async def seed(c: httpx.AsyncClient) -> dict[str, str]:
    """An assistant, a thread with one finished run (so: a checkpoint) and a store item."""
    assistant = (await c.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
    thread = (await c.post("/threads", json={"metadata": {"owner": "a"}})).json()
    r = await c.post(
        f"/threads/{thread['thread_id']}/runs/wait",
        json={"assistant_id": assistant["assistant_id"], "input": ASK},
    )
    assert r.status_code == 200 and r.json()["messages"][-1]["content"] == "The result is 42."
    runs = (await c.get(f"/threads/{thread['thread_id']}/runs")).json()
    state = (await c.get(f"/threads/{thread['thread_id']}/state")).json()
    put = await c.put(
        "/store/items", json={"namespace": ["shared", "ns"], "key": "k", "value": {"v": "a"}}
    )
    assert put.status_code == 204
    return {
        "a": assistant["assistant_id"],
        "t": thread["thread_id"],
        "r": runs[0]["run_id"],
        "c": state["checkpoint"]["checkpoint_id"],
    }


@pytest.fixture
async def world(server: LiveServer) -> AsyncIterator[World]:
    """Tenant A with resources; tenant B with a read-write key, an assistant and a thread."""
    async with client(server, server.admin_key) as a, client(server) as anon:
        ids = await seed(a)
        b_key = (await new_key(a, "t2", "read-write"))["key"]
        async with client(server, b_key) as b:
            ba = (await b.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
            bt = (await b.post("/threads", json={})).json()
            b_ids = {"ba": ba["assistant_id"], "bt": bt["thread_id"]}
            yield World(a, b, anon, ids, b_ids, [server.admin_key, b_key])


# (method, path, JSON body) for every endpoint family; {a} {t} {r} {c} are tenant A's ids
# (or made-up ones), {ba} {bt} tenant B's own assistant and thread.
BY_ID: list[tuple[str, str, Any]] = [
    ("GET", "/assistants/{a}", None),
    ("PATCH", "/assistants/{a}", {"name": "stolen"}),
    ("DELETE", "/assistants/{a}", None),
    ("POST", "/assistants/{a}/versions", {}),
    ("POST", "/assistants/{a}/latest", {"version": 1}),
    ("GET", "/assistants/{a}/schemas", None),
    ("GET", "/assistants/{a}/graph", None),
    ("GET", "/assistants/{a}/subgraphs", None),
    ("GET", "/threads/{t}", None),
    ("PATCH", "/threads/{t}", {"metadata": {"owner": "b"}}),
    ("DELETE", "/threads/{t}", None),
    ("POST", "/threads/{t}/copy", None),
    ("GET", "/threads/{t}/state", None),
    ("GET", "/threads/{t}/state/{c}", None),
    ("GET", "/threads/{bt}/state/{c}", None),
    ("POST", "/threads/{t}/state", {"values": {"messages": [{"role": "user", "content": "x"}]}}),
    ("GET", "/threads/{t}/history", None),
    ("POST", "/threads/{t}/history", {"limit": 5}),
    ("POST", "/threads/{t}/runs", {"assistant_id": "{ba}", "input": ASK}),
    ("POST", "/threads/{t}/runs/stream", {"assistant_id": "{ba}", "input": ASK}),
    ("POST", "/threads/{t}/runs/wait", {"assistant_id": "{ba}", "input": ASK}),
    ("POST", "/threads/{bt}/runs", {"assistant_id": "{a}", "input": ASK}),
    ("POST", "/runs", {"assistant_id": "{a}", "input": ASK}),
    ("POST", "/runs/wait", {"assistant_id": "{a}", "input": ASK}),
    ("POST", "/runs/stream", {"assistant_id": "{a}", "input": ASK}),
    ("GET", "/threads/{t}/runs", None),
    ("GET", "/threads/{t}/runs/{r}", None),
    ("GET", "/threads/{bt}/runs/{r}", None),
    ("DELETE", "/threads/{t}/runs/{r}", None),
    ("POST", "/threads/{t}/runs/{r}/cancel", None),
    ("POST", "/threads/{t}/runs/{r}/cancel?wait=true", None),
    ("GET", "/threads/{t}/runs/{r}/join", None),
    ("GET", "/threads/{t}/runs/{r}/stream", None),
    ("GET", "/runs/{r}", None),
]


def fill(template: Any, ids: dict[str, str]) -> Any:
    """``template`` (a path or a JSON body) with ``{name}`` placeholders replaced."""
    if isinstance(template, str):
        for name, value in ids.items():
            template = template.replace("{" + name + "}", value)
        return template
    if isinstance(template, dict):
        return {k: fill(v, ids) for k, v in template.items()}
    return template


async def call(
    c: httpx.AsyncClient, method: str, path: str, body: Any, **headers: str
) -> httpx.Response:
    """One request; a JSON body when one is given."""
    return await c.request(method, path, json=body, headers=headers)


def masked(response: httpx.Response, ids: dict[str, str]) -> str:
    """The body with the ids in it replaced by their names, to compare shapes."""
    text = response.text
    for name, real in ids.items():
        text = text.replace(real, "<" + name + ">")
    return text


async def test_other_tenants_ids_answer_404_like_missing_ids(world: World) -> None:
    theirs = {**world.ids, **world.b_ids}
    missing = {k: str(uuid.uuid4()) for k in world.ids} | world.b_ids
    for method, path, body in BY_ID:
        seen = await call(world.b, method, fill(path, theirs), fill(body, theirs))
        made_up = await call(world.b, method, fill(path, missing), fill(body, missing))
        where = f"{method} {path}: {seen.text} / {made_up.text}"
        assert seen.status_code == made_up.status_code == 404, where
        assert masked(seen, theirs) == masked(made_up, missing), where
        assert seen.headers["content-type"] == made_up.headers["content-type"], where
        assert seen.json()["detail"].endswith("not found"), where
    # and tenant A's resources are untouched
    a, t, r = world.a, world.ids["t"], world.ids["r"]
    assistant = (await a.get(f"/assistants/{world.ids['a']}")).json()
    assert assistant["version"] == 1 and assistant["name"] != "stolen"
    assert (await a.get(f"/threads/{t}")).json()["metadata"] == {"owner": "a"}
    assert (await a.get(f"/threads/{t}/runs/{r}")).json()["status"] == "success"
    assert len((await a.get(f"/threads/{t}/runs")).json()) == 1
    assert len((await a.get(f"/threads/{t}/state")).json()["values"]["messages"]) == 4
    assert (await a.post("/threads/count", json={})).json() == 1
    # nothing B tried landed in B's tenant either (no copies, no runs on B's thread)
    assert (await world.b.post("/threads/count", json={})).json() == 1
    assert (await world.b.get(f"/threads/{world.b_ids['bt']}/runs")).json() == []


async def test_ids_are_per_tenant_another_tenants_id_is_free(world: World) -> None:
    """Creating with another tenant's id works exactly as with an unused id: B gets its own
    thread and assistant under A's ids, runs on them, and neither tenant sees the other's."""
    t, a = world.ids["t"], world.ids["a"]
    made = await world.b.post("/threads", json={"thread_id": t, "metadata": {"owner": "b"}})
    assert made.status_code == 200, made.text
    assert made.json()["thread_id"] == t and made.json()["values"] == {}
    mine = await world.b.post(
        "/assistants", json={"assistant_id": a, "graph_id": "agent", "config": CALC, "name": "b"}
    )
    assert mine.status_code == 200, mine.text
    assert mine.json()["version"] == 1
    again = await world.b.post("/threads", json={"thread_id": t})
    assert again.status_code == 409  # now it is B's own id: taken
    run = await world.b.post(f"/threads/{t}/runs/wait", json={"assistant_id": a, "input": ASK})
    assert run.status_code == 200, run.text
    assert run.json()["messages"][-1]["content"] == "The result is 42."
    patched = await world.b.patch(f"/assistants/{a}", json={"metadata": {"v": 2}})
    assert patched.json()["version"] == 2
    # B's thread has B's one run and B's messages; A's thread is as A left it
    assert len((await world.b.get(f"/threads/{t}/runs")).json()) == 1
    assert (await world.b.get(f"/threads/{t}")).json()["metadata"] == {"owner": "b"}
    assert (await world.a.get(f"/threads/{t}")).json()["metadata"] == {"owner": "a"}
    assert len((await world.a.get(f"/threads/{t}/runs")).json()) == 1
    a_state = (await world.a.get(f"/threads/{t}/state")).json()
    b_state = (await world.b.get(f"/threads/{t}/state")).json()
    assert len(a_state["values"]["messages"]) == len(b_state["values"]["messages"]) == 4
    assert a_state["checkpoint"]["checkpoint_id"] != b_state["checkpoint"]["checkpoint_id"]
    assert (await world.a.get(f"/assistants/{a}")).json()["version"] == 1
    versions = await world.a.post(f"/assistants/{a}/versions", json={})
    assert [v["version"] for v in versions.json()] == [1]
    # deleting B's thread leaves A's
    assert (await world.b.delete(f"/threads/{t}")).status_code == 204
    assert (await world.a.get(f"/threads/{t}")).status_code == 200
    assert len((await world.a.get(f"/threads/{t}/history")).json()) >= 3


async def test_search_count_and_store_are_per_tenant(world: World) -> None:
    a, b, ids = world.a, world.b, world.ids
    assert [x["assistant_id"] for x in (await b.post("/assistants/search", json={})).json()] == [
        world.b_ids["ba"]
    ]
    assert (await b.post("/assistants/count", json={})).json() == 1
    assert (await b.post("/assistants/count", json={"graph_id": "agent"})).json() == 1
    assert [x["thread_id"] for x in (await b.post("/threads/search", json={})).json()] == [
        world.b_ids["bt"]
    ]
    assert (await b.post("/threads/search", json={"ids": [ids["t"]]})).json() == []
    assert (await b.post("/threads/search", json={"metadata": {"owner": "a"}})).json() == []
    assert (await b.post("/threads/count", json={})).json() == 1
    assert (await b.post("/threads/count", json={"metadata": {"owner": "a"}})).json() == 0
    assert (await a.post("/threads/count", json={"metadata": {"owner": "a"}})).json() == 1

    # the store: the same namespace and key are two different items
    item = "/store/items?namespace=shared.ns&key=k"
    missing = await b.get("/store/items?namespace=shared.ns&key=nope")
    seen = await b.get(item)  # A's item: to B, as missing as one nobody made (200, null)
    assert (seen.status_code, seen.json()) == (missing.status_code, missing.json()) == (200, None)
    assert (await b.post("/store/items/search", json={"namespace_prefix": ["shared"]})).json() == {
        "items": []
    }
    assert (await b.post("/store/namespaces", json={})).json() == {"namespaces": []}
    assert (
        await b.request("DELETE", "/store/items", json={"namespace": ["shared", "ns"], "key": "k"})
    ).status_code == 204
    put = {"namespace": ["shared", "ns"], "key": "k", "value": {"v": "b"}}
    assert (await b.put("/store/items", json=put)).status_code == 204
    assert (await b.get(item)).json()["value"] == {"v": "b"}
    assert (await a.get(item)).json()["value"] == {"v": "a"}
    found = (await a.post("/store/items/search", json={"namespace_prefix": ["shared"]})).json()
    assert [i["value"] for i in found["items"]] == [{"v": "a"}]
    assert (await b.post("/store/namespaces", json={})).json() == {"namespaces": [["shared", "ns"]]}
    await a.put("/store/items", json={"namespace": ["only", "a"], "key": "k", "value": {}})
    assert (await b.post("/store/namespaces", json={})).json() == {"namespaces": [["shared", "ns"]]}
    assert (await a.post("/store/namespaces", json={})).json() == {
        "namespaces": [["only", "a"], ["shared", "ns"]]
    }


# One request per endpoint family and kind of access.
READS: list[tuple[str, str, Any]] = [
    ("GET", "/assistants/{a}", None),
    ("POST", "/assistants/search", {}),
    ("POST", "/assistants/count", {}),
    ("POST", "/assistants/{a}/versions", {}),
    ("GET", "/assistants/{a}/schemas", None),
    ("GET", "/assistants/{a}/graph", None),
    ("GET", "/threads/{t}", None),
    ("POST", "/threads/search", {}),
    ("POST", "/threads/count", {}),
    ("GET", "/threads/{t}/state", None),
    ("GET", "/threads/{t}/history", None),
    ("POST", "/threads/{t}/history", {}),
    ("GET", "/threads/{t}/runs", None),
    ("GET", "/threads/{t}/runs/{r}", None),
    ("GET", "/threads/{t}/runs/{r}/join", None),
    ("GET", "/threads/{t}/runs/{r}/stream", None),
    ("GET", "/runs/{r}", None),
    ("GET", "/store/items?namespace=shared.ns&key=k", None),
    ("POST", "/store/items/search", {"namespace_prefix": ["shared"]}),
    ("POST", "/store/namespaces", {}),
]
WRITES: list[tuple[str, str, Any]] = [
    ("POST", "/assistants", {"graph_id": "agent"}),
    ("PATCH", "/assistants/{a}", {"name": "changed"}),
    ("POST", "/assistants/{a}/latest", {"version": 1}),
    ("DELETE", "/assistants/{a}", None),
    ("POST", "/threads", {}),
    ("PATCH", "/threads/{t}", {"metadata": {"owner": "ro"}}),
    ("POST", "/threads/{t}/copy", None),
    ("POST", "/threads/{t}/state", {"values": {"messages": [{"role": "user", "content": "x"}]}}),
    ("DELETE", "/threads/{t}", None),
    ("POST", "/threads/{t}/runs", {"assistant_id": "{a}", "input": ASK}),
    ("POST", "/threads/{t}/runs/stream", {"assistant_id": "{a}", "input": ASK}),
    ("POST", "/threads/{t}/runs/wait", {"assistant_id": "{a}", "input": ASK}),
    ("POST", "/runs", {"assistant_id": "{a}", "input": ASK}),
    ("POST", "/threads/{t}/runs/{r}/cancel", None),
    ("DELETE", "/threads/{t}/runs/{r}", None),
    ("PUT", "/store/items", {"namespace": ["shared", "ns"], "key": "k", "value": {"v": "ro"}}),
    ("DELETE", "/store/items", {"namespace": ["shared", "ns"], "key": "k"}),
]
ADMIN = [("POST", "/admin/keys", {"tenant_id": "default", "scope": "read-write"})]


async def test_requests_without_a_valid_key_are_401(server: LiveServer, world: World) -> None:
    revocable = await new_key(world.a, "default", "read-write")
    async with client(server, revocable["key"]) as soon_revoked:
        assert (await soon_revoked.get(f"/threads/{world.ids['t']}")).status_code == 200
        r = await world.a.delete(f"/admin/keys/{revocable['key_id']}")
        assert r.status_code == 204
        assert (await world.a.delete(f"/admin/keys/{revocable['key_id']}")).status_code == 404
        for method, path, body in READS + WRITES + ADMIN:
            url, payload = fill(path, world.ids), fill(body, world.ids)
            for headers in (
                {},
                {"x-api-key": "nmb_" + "x" * 40},
                {"authorization": "Bearer nmb_wrong"},
                {"authorization": f"Basic {server.admin_key}"},
                {"x-api-key": revocable["key"]},
            ):
                r = await call(world.anon, method, url, payload, **headers)
                assert r.status_code == 401, (method, url, headers, r.text)
                assert r.json()["status"] == 401 and "key" in r.json()["detail"]
                assert r.headers["www-authenticate"] == "Bearer"
            r = await call(
                world.anon, method, url, payload, authorization="Bearer " + revocable["key"]
            )
            assert r.status_code == 401
    # the bearer form of a valid key works as well as x-api-key
    ok = await world.anon.get(
        f"/threads/{world.ids['t']}", headers={"authorization": f"Bearer {server.admin_key}"}
    )
    assert ok.status_code == 200 and ok.json()["thread_id"] == world.ids["t"]
    listed = {k["key_id"]: k for k in (await world.a.get("/admin/keys")).json()}
    assert listed[revocable["key_id"]]["revoked_at"] is not None
    assert all("key" not in k for k in listed.values())


async def test_read_only_key_reads_but_cannot_write(server: LiveServer, world: World) -> None:
    ro_key = (await new_key(world.a, "default", "read-only"))["key"]
    world.keys.append(ro_key)
    # ids that end like the read-only POST routes must not open a way around the scope
    for odd in ("search", "count"):
        assert (await world.a.post("/threads", json={"thread_id": odd})).status_code == 200
    async with client(server, ro_key) as ro:
        for method, path, body in READS:
            r = await call(ro, method, fill(path, world.ids), fill(body, world.ids))
            assert r.status_code == 200, (method, path, r.text)
        for method, path, body in WRITES:
            r = await call(ro, method, fill(path, world.ids), fill(body, world.ids))
            assert r.status_code == 403, (method, path, r.text)
            assert r.json() == {"detail": "this API key is read-only", "status": 403}
        for odd in ("search", "count"):
            assert (await ro.delete(f"/threads/{odd}")).status_code == 403
            assert (await ro.patch(f"/threads/{odd}", json={"metadata": {}})).status_code == 403
            assert (await ro.get(f"/threads/{odd}")).status_code == 200
        r = await ro.post("/admin/keys", json={"tenant_id": "default", "scope": "admin"})
        assert r.status_code == 403 and r.json()["detail"] == "an admin API key is required"
    a, t = world.a, world.ids["t"]
    assert (await a.get(f"/threads/{t}")).json()["metadata"] == {"owner": "a"}
    assert len((await a.get(f"/threads/{t}/runs")).json()) == 1
    assert (await a.get(f"/assistants/{world.ids['a']}")).json()["name"] != "changed"
    assert (await a.get("/store/items?namespace=shared.ns&key=k")).json()["value"] == {"v": "a"}
    assert (await a.post("/threads/count", json={})).json() == 3  # the seed and the two odd ids


async def test_tenant_admin_manages_only_its_own_keys(server: LiveServer, world: World) -> None:
    t2_admin = await new_key(world.a, "t2", "admin")
    world.keys.append(t2_admin["key"])
    async with client(server, t2_admin["key"]) as admin2:
        for tenant in ("t3", "default"):
            r = await admin2.post("/admin/keys", json={"tenant_id": tenant, "scope": "admin"})
            assert r.status_code == 403, r.text
            assert "own tenant" in r.json()["detail"]
        own = await admin2.post("/admin/keys", json={"tenant_id": "t2", "scope": "read-only"})
        assert own.status_code == 200 and own.json()["tenant_id"] == "t2"
        world.keys.append(own.json()["key"])
        listed = (await admin2.get("/admin/keys")).json()
        assert {k["tenant_id"] for k in listed} == {"t2"} and len(listed) == 3
        operator_keys = (await world.a.get("/admin/keys")).json()
        operator = next(k for k in operator_keys if k["tenant_id"] == "default")
        assert (await admin2.delete(f"/admin/keys/{operator['key_id']}")).status_code == 404
    # a read-write key is no admin
    r = await world.b.post("/admin/keys", json={"tenant_id": "t2", "scope": "admin"})
    assert r.status_code == 403 and r.json()["detail"] == "an admin API key is required"
    assert (await world.b.get("/admin/keys")).status_code == 403
    # the operator's key still works: the revocation attempt above did nothing
    assert (await world.a.get("/admin/keys")).status_code == 200
    bad = await world.a.post("/admin/keys", json={"tenant_id": "no spaces", "scope": "admin"})
    assert bad.status_code == 422 and "tenant_id" in bad.json()["detail"]
    bad = await world.a.post("/admin/keys", json={"tenant_id": "t2", "scope": "root"})
    assert bad.status_code == 422 and "scope" in bad.json()["detail"]


async def test_revocation_reaches_every_server_process(
    server: LiveServer, world: World, tmp_path: Path
) -> None:
    key = await new_key(world.a, "t2", "read-write")
    async with (
        live_server(server.database_url, server.fake, tmp_path) as second,
        client(second, key["key"]) as other,
    ):
        assert (await other.get(f"/threads/{world.b_ids['bt']}")).status_code == 200
        assert (await world.a.delete(f"/admin/keys/{key['key_id']}")).status_code == 204
        deadline = time.monotonic() + 15  # the other process trusts a key it saw for a moment
        while (r := await other.get(f"/threads/{world.b_ids['bt']}")).status_code == 200:
            assert time.monotonic() < deadline, "the revoked key still works in another process"
            await asyncio.sleep(0.1)
        assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"


async def stored_keys(database_url: str) -> list[dict[str, Any]]:
    """Every row of api_keys, read from the database directly."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM api_keys")]
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM api_keys")]
    finally:
        await conn.close()


@pytest.mark.live  # reads the server's log
async def test_keys_are_never_logged_and_stored_hashed(server: LiveServer, world: World) -> None:
    keys = list(world.keys)
    for scope in ("admin", "read-only"):
        keys.append((await new_key(world.a, "t9", scope))["key"])
    # requests that log: failures, wrong keys, an upstream error, a revocation
    for key in keys:
        await world.anon.get("/threads/nope", headers={"authorization": f"Bearer {key}x"})
        await world.anon.get(f"/threads/{world.ids['t']}", headers={"x-api-key": key})
    server.fake.faults.append((401, {}, None))
    failed = await world.a.post("/runs/wait", json={"assistant_id": world.ids["a"], "input": ASK})
    assert failed.status_code == 200 and "__error__" in failed.json()
    r = await world.a.get("/admin/keys")
    assert r.status_code == 200 and not any(k in r.text for k in keys)

    logs = server.logs()
    assert '"http.request"' in logs and "run.finished" in logs  # the log is really there
    assert UPSTREAM_KEY not in logs
    for key in keys:
        assert key not in logs
        assert key[12:] not in logs  # not even the part after the prefix /admin/keys shows

    rows = await stored_keys(server.database_url)
    by_hash = {row["key_hash"]: row for row in rows}
    assert len(rows) >= len(keys)
    for key in keys:
        digest = hashlib.sha256(key.encode()).hexdigest()
        assert digest in by_hash
        assert by_hash[digest]["prefix"] == key[:12]
        for row in rows:
            assert not any(isinstance(v, str) and key in v for v in row.values())
