"""What ``nimbus run`` and ``nimbus chat`` share: building the agent, model and tools from
flags and settings, and rendering a run's events in the terminal."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from nimbus.adapters.llm import resolve_model
from nimbus.adapters.tools.builtin import builtin_tools
from nimbus.core.agent import Agent, load_agent
from nimbus.core.events import (
    Event,
    RunFailedEvent,
    TextDeltaEvent,
    ToolCallFinished,
    ToolCallStarted,
)
from nimbus.core.messages import Message, SystemMessage, messages_to_python
from nimbus.core.model import Model
from nimbus.core.runtime import RunResult, run
from nimbus.core.tool import Tool
from nimbus.settings import Settings

#: The agent used when no ``--agent`` file is given.
DEFAULT_AGENT = Agent(
    name="assistant",
    instructions="You are a helpful assistant. Answer briefly and accurately.",
    tools=["calculator", "current_time"],
)


def result_to_json(result: RunResult) -> dict[str, Any]:
    """A run's result as JSON-compatible data: answer, messages, tool calls, usage, timings."""
    return {
        "run_id": result.run_id,
        "output": result.output,
        "messages": messages_to_python(result.messages),
        "tool_calls": [
            {
                "id": call.id,
                "name": call.name,
                "arguments": call.arguments,
                "result": res.content if res else None,
                "is_error": res.is_error if res else None,
            }
            for call, res in result.tool_calls()
        ],
        "usage": {
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "total_tokens": result.usage.total_tokens,
            "requests": result.usage.requests,
        },
        "steps": result.steps,
        "timings": {
            "duration_s": round(result.duration_s, 6),
            "model_s": round(result.model_time_s, 6),
            "tools_s": round(result.tool_time_s, 6),
        },
    }


@dataclass
class Session:
    """An agent bound to its model and tools, ready to run turns in the terminal."""

    agent: Agent
    model: Model
    tools: list[Tool]
    out: Console
    err: Console

    @classmethod
    def create(cls, *, model: str | None, agent_file: Path | None, base_url: str | None) -> Session:
        """Build from CLI flags; bad flags raise :class:`~nimbus.exceptions.UserError`."""
        settings = Settings()
        if agent_file is not None:
            agent = load_agent(agent_file)
        else:
            agent = Agent(
                name=DEFAULT_AGENT.name,
                instructions=DEFAULT_AGENT.instructions,
                model=settings.default_model,
                tools=list(DEFAULT_AGENT.tools),
            )
        if model:
            agent.model = model
        tools = builtin_tools(settings).resolve(agent.tools)
        resolved = resolve_model(agent.model, settings, base_url=base_url)
        return cls(
            agent,
            resolved,
            tools,
            Console(highlight=False, soft_wrap=True),
            Console(stderr=True, highlight=False, soft_wrap=True),
        )

    def _render(self, event: Event) -> None:
        if isinstance(event, TextDeltaEvent):
            self.out.print(event.text, end="", markup=False)
            self.out.file.flush()
        elif isinstance(event, ToolCallStarted):
            self.err.print(f"[dim]→ {event.call.name}({event.call.arguments})[/dim]", markup=True)
        elif isinstance(event, ToolCallFinished):
            mark = "✗" if event.result.is_error else "←"
            text = event.result.content
            text = text if len(text) <= 200 else text[:200] + "…"
            self.err.print(f"{mark} {text}", style="dim", markup=False)
        elif isinstance(event, RunFailedEvent):
            self.out.print()

    async def turn(self, messages: list[Message], *, stream: bool) -> RunResult:
        """Run one turn over ``messages`` (without the system prompt)."""
        return await run(
            self.agent,
            messages,
            model=self.model,
            tools=self.tools,
            on_event=self._render if stream else None,
            stream_tokens=stream,
        )

    async def run_once(self, prompt: str, *, json_output: bool) -> int:
        """``nimbus run``: one turn, streamed or as JSON."""
        from nimbus.core.messages import UserMessage

        try:
            result = await self.turn([UserMessage(prompt)], stream=not json_output)
        finally:
            await self.model.aclose()
        if json_output:
            sys.stdout.write(
                orjson.dumps(result_to_json(result), option=orjson.OPT_INDENT_2).decode()
            )
            sys.stdout.write("\n")
        else:
            self.out.print()
        return 0

    async def chat(self) -> int:
        """``nimbus chat``: read a line, run a turn, keep the conversation."""
        from nimbus.core.messages import UserMessage
        from nimbus.exceptions import RunFailed

        history: list[Message] = []
        self.err.print(
            f"Chatting with {self.agent.name} ({self.agent.model}). "
            "Ctrl-D or /exit to leave, /reset to start over.",
            style="dim",
        )
        try:
            while True:
                try:
                    line = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    self.out.print()
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text in ("/exit", "/quit"):
                    return 0
                if text == "/reset":
                    history.clear()
                    self.err.print("(conversation cleared)", style="dim")
                    continue
                self.out.print(f"{self.agent.name}> ", end="")
                try:
                    result = await self.turn([*history, UserMessage(text)], stream=True)
                except RunFailed as exc:
                    self.err.print(f"run failed ({exc.reason}): {exc}", markup=False)
                    continue
                self.out.print()
                history = [m for m in result.messages if not isinstance(m, SystemMessage)]
        finally:
            await self.model.aclose()
