"""``nimbus serve`` on an SQLite database in memory (``sqlite://``): it starts, the admin key it
prints works, and runs are stored and read back like on a file, for as long as it runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from langgraph_sdk import get_client

from nimbus.testing.fake_openai import FakeOpenAIServer
from tests.postgres import free_port
from tests.server.conftest import wait_listening

MEMORY = ("--database-url", "sqlite://")


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


def _databases(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in (".db", ".sqlite")]


async def _printed_key(process: subprocess.Popen[bytes], log: Path, port: int) -> str:
    """The admin key ``nimbus serve`` printed, once it listens."""
    await wait_listening(process, port, lambda: _read(log))
    found = re.search(r"Admin API key \(shown once, keep it\): (nmb_\S+)", _read(log))
    assert found is not None, _read(log)
    return found.group(1)


async def test_a_server_on_a_database_in_memory(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
    async with FakeOpenAIServer(tool_arguments='{"expression": "6 * 7"}') as fake:
        env |= {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-upstream"}
        with log.open("wb") as out:
            process = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped below
                [sys.executable, "-m", "nimbus", "serve", "--port", str(port), *MEMORY],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        try:
            key = await _printed_key(process, log, port)
            client = get_client(url=f"http://127.0.0.1:{port}", api_key=key)
            assistant = await client.assistants.create(
                graph_id="agent",
                config={"configurable": {"model": "openai:fake-model", "tools": ["calculator"]}},
            )
            thread = await client.threads.create()
            for _ in range(3):  # runs one after another on the one connection
                values = await client.runs.wait(
                    thread["thread_id"],
                    assistant["assistant_id"],
                    input={"messages": [{"role": "user", "content": "What is 6 times 7?"}]},
                )
                assert isinstance(values, dict)
                assert values["messages"][-1]["content"] == "The result is 42."
            state = await client.threads.get_state(thread["thread_id"])
            assert [m["type"] for m in state["values"]["messages"]] == [
                "human",
                "ai",
                "tool",
                "ai",
            ] * 3
            runs = await client.runs.list(thread["thread_id"])
            assert [r["status"] for r in runs] == ["success"] * 3
        finally:
            process.terminate()
            process.wait(timeout=20)
    assert "Traceback" not in _read(log)
    assert not _databases(tmp_path), "nothing is written to disk"
