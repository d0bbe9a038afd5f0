"""Schemathesis against the live server's own ``/openapi.json``: for every operation, valid
and invalid requests generated from the schema — on made-up ids and on ids that exist —
never get a 5xx, and every 4xx is a JSON problem that says what is wrong."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.server.conftest import LiveServer, live_server

# Examples per operation, mode (valid / invalid data) and id kind (made up / existing):
# about 25 s for the whole schema per database on a 2-core machine.
EXAMPLES = 12
CALC = {"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}}
# Streaming endpoints end when their run ends, and runs here end in milliseconds (the fake
# model answers at once), so no operation is excluded; the timeout is a backstop.
REQUEST_TIMEOUT_S = 30


async def seed(server: LiveServer) -> dict[str, str]:
    """Ids that exist: an assistant, a thread with one finished run and its checkpoint."""
    async with httpx.AsyncClient(
        base_url=server.url, headers={"x-api-key": server.admin_key}, timeout=30
    ) as c:
        assistant = (await c.post("/assistants", json={"graph_id": "agent", "config": CALC})).json()
        thread = (await c.post("/threads", json={})).json()["thread_id"]
        values = await c.post(
            f"/threads/{thread}/runs/wait",
            json={"assistant_id": assistant["assistant_id"], "input": {"messages": ["hi"]}},
        )
        assert values.status_code == 200, values.text
        run = (await c.get(f"/threads/{thread}/runs")).json()[0]["run_id"]
        state = (await c.get(f"/threads/{thread}/state")).json()
    return {
        "assistant_id": assistant["assistant_id"],
        "thread_id": thread,
        "run_id": run,
        "checkpoint_id": state["checkpoint"]["checkpoint_id"],
    }


def problem_json(path: str, response: Any) -> None:
    """A 4xx must say what is wrong in JSON: ``{"detail": <text>, "status": <code>}``, or
    on the OpenAI-compatible ``/v1`` routes OpenAI's ``{"error": {"message": <text>}}``
    (an unmatched URL under ``/v1`` is an ordinary 404 problem)."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    assert isinstance(body, dict), body
    if path.startswith("/v1/") and "error" in body:
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        return
    assert isinstance(body.get("detail"), str) and body["detail"], body
    assert body.get("status") == response.status_code, body


def explore(strategy: Any, path: str, auth: dict[str, str]) -> None:
    """Call the server with each case of ``strategy``; raises on the first failing one."""

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    def check(case: Any) -> None:
        response = case.call(headers=auth, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=[not_a_server_error])
        problem_json(path, response)

    check()


def fuzz(server: LiveServer, existing: dict[str, str]) -> list[str]:
    """Run every operation of the schema; returns the failures found (empty: none)."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    auth = {"x-api-key": server.admin_key}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40  # the whole API, not an empty schema
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        pins: list[dict[str, str] | None] = [None]
        # existing ids reach the handlers' deeper code; deleting them would end that early
        if names and names <= existing.keys() and operation.method.upper() != "DELETE":
            pins.append({name: existing[name] for name in names})
        modes = [GenerationMode.POSITIVE]
        if len(operation.query) or len(operation.body):  # path ids are any string: always valid
            modes.append(GenerationMode.NEGATIVE)
        for pinned in pins:
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=pinned)
                ids = "existing" if pinned else "made-up"
                where = f"{operation.label} ({mode.value}, {ids} ids)"
                try:
                    explore(strategy, operation.path, auth)
                except Unsatisfiable:
                    # an invalid request may be impossible to build (say, only a pinned id and
                    # a boolean flag); a valid one never is
                    if mode is GenerationMode.POSITIVE:
                        failures.append(f"{where}: no valid request could be generated")
                except (Exception, BaseExceptionGroup) as exc:  # FailureGroup is the latter
                    failures.append(f"{where}: {exc}")
    return failures


async def test_no_generated_request_gets_a_server_error(database_url: str, tmp_path: Path) -> None:
    async with (
        FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake,
        live_server(database_url, fake, tmp_path) as server,
    ):
        existing = await seed(server)
        # in a thread: the fake model is served by this event loop and must keep answering
        failures = await asyncio.to_thread(fuzz, server, existing)
        assert failures == [], "\n\n".join(failures)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            assert (await c.get("/ok")).json() == {"ok": True}
    logs = server.logs()
    assert "Traceback" not in logs and "run.crashed" not in logs
