"""The CLI against a live server: keys, assistants from agent files, ``run --url``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from langgraph_sdk import get_client

from tests.server.conftest import LiveServer


async def nimbus(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nimbus",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_keys_create_prints_only_the_key(server: LiveServer) -> None:
    env = {"NIMBUS_DATABASE_URL": server.database_url}
    code, out, err = await nimbus(
        "keys", "create", "--tenant", "acme", "--scope", "read-only", env=env
    )
    assert code == 0, err
    key = out.strip()
    assert key.startswith("nmb_") and len(out.splitlines()) == 1
    client = get_client(url=server.url, api_key=key)
    assert await client.assistants.search() == []  # the key works, for its own tenant
    code, out, _ = await nimbus("keys", "list", "--tenant", "acme", env=env)
    assert code == 0 and "acme" in out and "read-only" in out and key not in out
    key_id = out.split()[0]
    code, _, err = await nimbus("keys", "revoke", key_id, env=env)
    assert code == 0, err
    code, _, err = await nimbus("keys", "create", "--tenant", "acme", "--scope", "god", env=env)
    assert code == 2 and "--scope must be one of" in err


async def test_assistants_from_agent_file_and_run_url(server: LiveServer, tmp_path: Path) -> None:
    agent = tmp_path / "calc.yaml"
    agent.write_text(
        "name: calc\ninstructions: Use the calculator.\nmodel: openai:fake-model\n"
        "tools: [calculator]\n"
    )
    env = {"NIMBUS_API_KEY": server.admin_key}
    code, out, err = await nimbus("assistants", "create", str(agent), "--url", server.url, env=env)
    assert code == 0, err
    created = json.loads(out)
    assert created["name"] == "calc"
    assert created["config"]["configurable"]["tools"] == ["calculator"]
    code, out, err = await nimbus("assistants", "list", "--url", server.url, env=env)
    assert code == 0 and created["assistant_id"] in out and "openai:fake-model" in out

    code, out, err = await nimbus(
        "run", "6 times 7?", "--url", server.url, "--assistant", "calc", env=env
    )
    assert code == 0, err
    assert out.strip() == "The result is 42."
    assert "calculator" in err  # the tool call was shown as it happened
    code, out, err = await nimbus(
        "run", "6 times 7?", "--url", server.url, "--agent", str(agent), "--json", env=env
    )
    assert code == 0, err
    assert json.loads(out)["messages"][-1]["content"] == "The result is 42."


async def test_run_url_errors_are_one_line(server: LiveServer) -> None:
    code, _, err = await nimbus("run", "x", "--url", server.url, "--api-key", "wrong")
    assert code == 1 and "401" in err and len(err.strip().splitlines()) == 1
    code, _, err = await nimbus(
        "run",
        "x",
        "--url",
        server.url,
        "--assistant",
        "nope",
        env={"NIMBUS_API_KEY": server.admin_key},
    )
    assert code == 1 and "404" in err
    code, _, err = await nimbus("run", "x", "--assistant", "calc")
    assert code == 2 and "--assistant needs --url" in err
