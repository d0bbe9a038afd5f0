"""The ``nimbus`` command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from nimbus.testing.fake_openai import FakeOpenAIServer


async def nimbus(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nimbus",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_run_with_openai_endpoint_runs_the_tool(fake_openai: FakeOpenAIServer) -> None:
    code, out, err = await nimbus(
        "run",
        "What is 6 times 7?",
        "--model",
        "openai:fake-model",
        "--base-url",
        fake_openai.base_url,
    )
    assert code == 0, err
    assert out.strip() == "The result is 42."  # the answer uses the calculator's result
    assert "calculator" in err  # the tool call was shown as it happened
    first, second = fake_openai.requests
    assert {t["function"]["name"] for t in first["tools"]} == {"calculator", "current_time"}
    assert first.get("stream") is True
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": second["messages"][-2]["tool_calls"][0]["id"],
        "content": "42",
    }


async def test_run_json_output(fake_openai: FakeOpenAIServer) -> None:
    code, out, err = await nimbus(
        "run",
        "6*7?",
        "--json",
        "--model",
        "openai:fake-model",
        "--base-url",
        fake_openai.base_url,
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["output"] == "The result is 42."
    assert data["tool_calls"] == [
        {
            "id": data["tool_calls"][0]["id"],
            "name": "calculator",
            "arguments": '{"expression": "6 * 7"}',
            "result": "42",
            "is_error": False,
        }
    ]
    assert [m["kind"] for m in data["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert data["usage"]["requests"] == 2 and data["usage"]["input_tokens"] > 0
    assert data["steps"] == 2
    assert data["timings"]["duration_s"] >= data["timings"]["model_s"] > 0


async def test_base_url_from_environment(fake_openai: FakeOpenAIServer) -> None:
    code, out, err = await nimbus(
        "run",
        "hi",
        "--model",
        "openai:fake-model",
        env={"OPENAI_BASE_URL": fake_openai.base_url, "OPENAI_API_KEY": "sk-test"},
    )
    assert code == 0, err
    assert out.strip() == "The result is 42."


async def test_agent_file(tmp_path: Path, fake_openai: FakeOpenAIServer) -> None:
    agent = tmp_path / "echo.yaml"
    agent.write_text("name: echoer\ninstructions: Repeat.\nmodel: test:echo\n")
    code, out, err = await nimbus("run", "say this back", "--agent", str(agent))
    assert code == 0, err
    assert out.strip() == "say this back"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "x", "--bogus"], "No such option: --bogus"),
        (["run"], "Missing argument"),
        (["run", "x", "--model", "nope"], "must look like 'provider:name'"),
        (["run", "x", "--model", "mystery:model"], "unknown model provider 'mystery'"),
        (["run", "x", "--agent", "/does/not/exist.yaml"], "cannot read agent file"),
        (["run", "x", "--model", "test:echo", "--base-url", "http://x"], "--base-url only"),
        (["bench", "runtime", "--concurrency", "a,b"], "comma-separated list of integers"),
        (["bench", "server", "--database", "mysql"], "--database must be sqlite, postgres"),
        (["bench", "server", "--modes", "poll"], "unknown mode 'poll'"),
        (["bench", "server", "--server-cpu", "4096"], "--server-cpu 4096 is not a core"),
        (
            [
                "bench",
                "server",
                "--database",
                "postgres",
                "--postgres-url",
                "postgresql://u@127.0.0.1:1/x",
            ],
            "no PostgreSQL answers at 127.0.0.1:1/x",
        ),
        (["bench", "compare", "/"], "/ holds no Nimbus sources"),
        (["bench", "compare", "src", "--mode", "poll"], "--mode must be one of stream, wait"),
        (["bench", "compare", "src", "--database", "both"], "--database must be sqlite or"),
        (["frobnicate"], "No such command"),
    ],
)
async def test_bad_input_is_one_line_and_non_zero(args: list[str], message: str) -> None:
    code, out, err = await nimbus(*args)
    assert code == 2
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


async def test_bad_agent_file_content(tmp_path: Path) -> None:
    agent = tmp_path / "a.toml"
    agent.write_text('name = "x"\nmax_stepz = 3\n')
    code, _, err = await nimbus("run", "x", "--agent", str(agent))
    assert code == 2
    assert "max_stepz" in err and len(err.strip().splitlines()) == 1


async def test_unreachable_endpoint_fails_cleanly() -> None:
    code, _, err = await nimbus(
        "run",
        "x",
        "--model",
        "openai:m",
        "--base-url",
        "http://127.0.0.1:9/v1",
        env={"NIMBUS_MODEL_MAX_RETRIES": "0"},
    )
    assert code == 1
    assert "POST http://127.0.0.1:9/v1/chat/completions" in err
    assert len(err.strip().splitlines()) == 1


async def test_chat_keeps_the_conversation(fake_openai: FakeOpenAIServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nimbus",
        "chat",
        "--model",
        "test:echo",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(b"first line\nsecond line\n/exit\n"), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "first line" in text and "second line" in text
    assert text.index("first line") < text.index("second line")
