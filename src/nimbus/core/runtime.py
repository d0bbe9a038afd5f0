"""The run loop: call the model, run the tool calls it asks for, feed results back, repeat
until a final answer or a limit.

Every completed model call and every completed tool call is a checkpoint: with a
:class:`~nimbus.core.checkpoint.CheckpointStore`, a run can resume from where it stopped
without repeating any completed call.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from nimbus.core.agent import Agent
from nimbus.core.checkpoint import CheckpointStore, RunState
from nimbus.core.events import (
    Event,
    ModelRequested,
    ModelResponded,
    RunFailedEvent,
    RunFinished,
    RunStarted,
    StepFinished,
    TextDeltaEvent,
    ToolCallFinished,
    ToolCallStarted,
)
from nimbus.core.messages import (
    AssistantMessage,
    Message,
    SystemMessage,
    ToolCall,
    ToolResultMessage,
    Usage,
    UserMessage,
)
from nimbus.core.model import Model, ModelResponse, ModelSettings, TextDelta, ToolSpec
from nimbus.core.tool import Tool, format_tool_output
from nimbus.exceptions import ModelError, RunFailed, ToolError

EventHandler = Callable[[Event], None]


@dataclass(slots=True)
class RunResult:
    """The outcome of a finished run."""

    run_id: str
    output: str
    messages: list[Message]
    usage: Usage
    steps: int
    duration_s: float
    model_time_s: float = 0.0
    tool_time_s: float = 0.0

    def tool_calls(self) -> list[tuple[ToolCall, ToolResultMessage | None]]:
        """Every tool call of the run with its result."""
        results = {m.tool_call_id: m for m in self.messages if isinstance(m, ToolResultMessage)}
        return [
            (call, results.get(call.id))
            for m in self.messages
            if isinstance(m, AssistantMessage)
            for call in m.tool_calls
        ]


@dataclass(slots=True)
class _Prepared:
    """A tool call checked before it runs: either runnable (tool + kwargs) or an error."""

    call: ToolCall
    tool: Tool | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _error_payload(kind: str, message: str) -> str:
    """A structured error the model reads as a tool result and can correct."""
    return json.dumps({"error": {"type": kind, "message": message}}, ensure_ascii=False)


def _prepare(call: ToolCall, tools: dict[str, Tool]) -> _Prepared:
    """Check a call without running it: known tool, valid JSON, arguments match the schema."""
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return _Prepared(
            call,
            error=_error_payload("unknown_tool", f"no tool named {call.name!r}; tools: {known}"),
        )
    try:
        kwargs = tool.validate(call.arguments)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"])
            problems.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        kind = (
            "invalid_json"
            if any(e["type"] == "json_invalid" for e in exc.errors())
            else ("invalid_arguments")
        )
        message = "; ".join(problems)
        return _Prepared(call, tool, error=_error_payload(kind, f"{call.name}: {message}"))
    return _Prepared(call, tool, kwargs)


def _pending_calls(messages: list[Message]) -> list[ToolCall]:
    """Tool calls of the last assistant message that have no result yet."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, AssistantMessage):
            if not m.tool_calls:
                return []
            done = {r.tool_call_id for r in messages[i + 1 :] if isinstance(r, ToolResultMessage)}
            return [c for c in m.tool_calls if c.id not in done]
    return []


def _last_step_calls(messages: list[Message]) -> list[ToolCall]:
    for m in reversed(messages):
        if isinstance(m, AssistantMessage):
            return m.tool_calls
    return []


class AgentRun:
    """One execution of an agent: holds the state and drives the loop.

    Use :func:`run` or :func:`stream` rather than this class directly.
    """

    def __init__(
        self,
        agent: Agent,
        model: Model,
        tools: Sequence[Tool],
        state: RunState,
        *,
        checkpoints: CheckpointStore | None = None,
        on_event: EventHandler | None = None,
        stream_tokens: bool = False,
    ) -> None:
        self.agent = agent
        self.model = model
        self.tools = {t.name: t for t in tools}
        self.tool_specs: list[ToolSpec] = [t.spec for t in tools]
        self.state = state
        self.checkpoints = checkpoints
        self.emit: EventHandler = on_event or _ignore
        self.stream_tokens = stream_tokens
        self.settings = ModelSettings(
            max_tokens=agent.limits.max_tokens, temperature=agent.temperature
        )
        self.model_time = 0.0
        self.tool_time = 0.0
        # Tool calls owed when the run (re)starts may have been running when an earlier
        # attempt stopped: a tool that is not idempotent is not called again for them.
        self.maybe_started = {c.id for c in _pending_calls(state.messages)}

    async def execute(self) -> RunResult:
        """Run to a final answer; raises :class:`RunFailed` when a limit or error stops it."""
        state = self.state
        started = time.perf_counter()
        self.emit(RunStarted(state.run_id, self.agent.name, self.model.model_id, state.step))
        if state.status == "finished":
            return self._result(started)
        try:
            async with asyncio.timeout(self.agent.limits.timeout_s):
                await self._loop(started)
        except TimeoutError:
            await self._fail(
                started, "timeout", f"run exceeded its {self.agent.limits.timeout_s:g}s time limit"
            )
        except ModelError as exc:
            where = f" ({exc.endpoint})" if exc.endpoint else ""
            await self._fail(started, "model_error", f"model call failed{where}: {exc}")
        return self._result(started)

    async def _loop(self, started: float) -> None:
        state, limits = self.state, self.agent.limits
        while True:
            step_started = time.perf_counter()
            # A run executes only the tool calls its own model asked for: calls owed before
            # its first model call came with its input or its thread's history (a client's
            # assistant message, a cancelled run), never a reason to run a tool.
            if state.step and _pending_calls(state.messages):
                await self._run_tools()
                self.emit(
                    StepFinished(
                        state.run_id, state.step, state.usage, time.perf_counter() - step_started
                    )
                )
                if state.tool_error_streak >= limits.max_tool_errors:
                    await self._fail(
                        started,
                        "tool_call_errors",
                        f"the model made only malformed tool calls {state.tool_error_streak} "
                        "steps in a row",
                    )
                continue
            if state.step >= limits.max_steps:
                await self._fail(
                    started, "max_steps", f"no final answer within {limits.max_steps} steps"
                )
            response = await self._call_model()
            message = response.message
            if message.tool_calls:
                await self._check_tool_calls(started, response)
            state.messages.append(message)
            state.step += 1
            state.usage.add(response.usage)
            if not message.tool_calls:
                state.status, state.output = "finished", message.content
            await self._checkpoint()
            if limits.max_total_tokens is not None and (
                state.usage.total_tokens > limits.max_total_tokens and message.tool_calls
            ):
                await self._fail(
                    started,
                    "token_budget",
                    f"run used {state.usage.total_tokens} tokens, over its budget of "
                    f"{limits.max_total_tokens}",
                )
            if not message.tool_calls:
                duration = time.perf_counter() - step_started
                self.emit(StepFinished(state.run_id, state.step, state.usage, duration))
                return

    async def _check_tool_calls(self, started: float, response: ModelResponse) -> None:
        """Fail the run when the model asks for more tool calls than its limits allow (the
        reply is not kept: it would only grow the thread); else count them."""
        state, limits = self.state, self.agent.limits
        asked = len(response.message.tool_calls)
        problem = None
        if asked > limits.max_tool_calls_per_step:
            problem = (
                f"the model asked for {asked} tool calls in one step; the limit is "
                f"{limits.max_tool_calls_per_step} (max_tool_calls_per_step)"
            )
        elif state.tool_calls + asked > limits.max_tool_calls:
            problem = (
                f"the model asked for {state.tool_calls + asked} tool calls in this run; the "
                f"limit is {limits.max_tool_calls} (max_tool_calls)"
            )
        if problem is not None:
            state.usage.add(response.usage)
            await self._fail(started, "max_tool_calls", problem)
        state.tool_calls += asked

    async def _call_model(self) -> ModelResponse:
        state = self.state
        step = state.step + 1
        self.emit(ModelRequested(state.run_id, step, len(state.messages)))
        t0 = time.perf_counter()
        if self.stream_tokens:
            response: ModelResponse | None = None
            async for item in self.model.stream(state.messages, self.tool_specs, self.settings):
                if isinstance(item, TextDelta):
                    self.emit(TextDeltaEvent(state.run_id, step, item.text))
                else:
                    response = item
            if response is None:
                raise ModelError("the model's stream ended without a response")
        else:
            response = await self.model.request(state.messages, self.tool_specs, self.settings)
        duration = time.perf_counter() - t0
        self.model_time += duration
        response.usage.requests = response.usage.requests or 1
        self.emit(ModelResponded(state.run_id, step, response.message, response.usage, duration))
        return response

    async def _run_tools(self) -> None:
        state = self.state
        prepared = [_prepare(c, self.tools) for c in _last_step_calls(state.messages)]
        pending = {c.id for c in _pending_calls(state.messages)}
        todo = [p for p in prepared if p.call.id in pending]
        if len(todo) == 1:
            await self._run_one(todo[0])
        else:
            await asyncio.gather(*(self._run_one(p) for p in todo))
        malformed = all(p.error is not None for p in prepared)
        streak = state.tool_error_streak + 1 if malformed else 0
        if streak != state.tool_error_streak:  # else each tool's checkpoint already has it all
            state.tool_error_streak = streak
            await self._checkpoint()

    async def _run_one(self, p: _Prepared) -> None:
        state = self.state
        self.emit(ToolCallStarted(state.run_id, state.step, p.call))
        t0 = time.perf_counter()
        if p.error is not None or p.tool is None:
            result = ToolResultMessage(p.call.id, p.call.name, p.error or "", is_error=True)
        elif not p.tool.idempotent and p.call.id in self.maybe_started:
            message = (
                f"{p.call.name} was running when this run was interrupted; it is not repeated "
                "because it may not be safe to run twice, so it may or may not have taken effect"
            )
            result = ToolResultMessage(
                p.call.id, p.call.name, _error_payload("interrupted", message), True
            )
        else:
            result = await self._invoke(p.call, p.tool, p.kwargs)
        duration = time.perf_counter() - t0
        self.tool_time += duration
        state.messages.append(result)
        await self._checkpoint()
        self.emit(ToolCallFinished(state.run_id, state.step, result, duration))

    async def _invoke(
        self, call: ToolCall, tool: Tool, kwargs: dict[str, Any]
    ) -> ToolResultMessage:
        timeout = tool.timeout_s or self.agent.limits.tool_timeout_s
        try:
            async with asyncio.timeout(timeout):
                value = await tool.call(kwargs)
            return ToolResultMessage(call.id, call.name, format_tool_output(value))
        except TimeoutError:
            message = f"{call.name} timed out after {timeout:g}s"
            return ToolResultMessage(call.id, call.name, _error_payload("timeout", message), True)
        except ToolError as exc:
            return ToolResultMessage(
                call.id, call.name, _error_payload("tool_error", str(exc)), True
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = f"{call.name} raised {type(exc).__name__}: {exc}"
            return ToolResultMessage(call.id, call.name, _error_payload("tool_error", text), True)

    async def _checkpoint(self) -> None:
        if self.checkpoints is not None:
            await self.checkpoints.save(self.state)

    async def _fail(self, started: float, reason: str, message: str) -> None:
        state = self.state
        state.status, state.error = "failed", f"{reason}: {message}"
        await self._checkpoint()
        duration = time.perf_counter() - started
        self.emit(RunFailedEvent(state.run_id, reason, message, state.step, state.usage, duration))
        raise RunFailed(message, reason=reason, run_id=state.run_id, step=state.step)

    def _result(self, started: float) -> RunResult:
        state = self.state
        duration = time.perf_counter() - started
        output = state.output or ""
        self.emit(RunFinished(state.run_id, output, state.step, state.usage, duration))
        return RunResult(
            state.run_id,
            output,
            state.messages,
            state.usage,
            state.step,
            duration,
            self.model_time,
            self.tool_time,
        )


def _ignore(event: Event) -> None:
    return None


def new_run_id() -> str:
    """A fresh, unique run id."""
    return uuid.uuid4().hex


def initial_messages(agent: Agent, input: str | Sequence[Message]) -> list[Message]:
    """The conversation a new run starts from: instructions, then the input."""
    messages: list[Message] = []
    if agent.instructions:
        messages.append(SystemMessage(agent.instructions))
    if isinstance(input, str):
        messages.append(UserMessage(input))
    else:
        messages.extend(input)
    return messages


async def run(
    agent: Agent,
    input: str | Sequence[Message],
    *,
    model: Model,
    tools: Sequence[Tool] = (),
    run_id: str | None = None,
    checkpoints: CheckpointStore | None = None,
    on_event: EventHandler | None = None,
    stream_tokens: bool = False,
) -> RunResult:
    """Run ``agent`` on ``input`` to a final answer (raises :class:`RunFailed` otherwise)."""
    state = RunState(run_id or new_run_id(), initial_messages(agent, input))
    await _save_first(checkpoints, state)
    return await AgentRun(
        agent,
        model,
        tools,
        state,
        checkpoints=checkpoints,
        on_event=on_event,
        stream_tokens=stream_tokens,
    ).execute()


async def resume(
    agent: Agent,
    run_id: str,
    *,
    model: Model,
    checkpoints: CheckpointStore,
    tools: Sequence[Tool] = (),
    on_event: EventHandler | None = None,
    stream_tokens: bool = False,
) -> RunResult:
    """Continue run ``run_id`` from its last checkpoint, repeating no completed call."""
    state = await checkpoints.load(run_id)
    if state is None:
        raise RunFailed(f"no checkpoint for run {run_id!r}", reason="not_found", run_id=run_id)
    if state.status == "failed":
        state.status, state.error = "running", None
    return await AgentRun(
        agent,
        model,
        tools,
        state,
        checkpoints=checkpoints,
        on_event=on_event,
        stream_tokens=stream_tokens,
    ).execute()


async def _save_first(checkpoints: CheckpointStore | None, state: RunState) -> None:
    if checkpoints is not None:
        await checkpoints.save(state)


async def stream(
    agent: Agent,
    input: str | Sequence[Message],
    *,
    model: Model,
    tools: Sequence[Tool] = (),
    run_id: str | None = None,
    checkpoints: CheckpointStore | None = None,
    stream_tokens: bool = True,
) -> AsyncIterator[Event]:
    """Run ``agent`` and yield its events as they happen (ends with RunFinished/RunFailed)."""
    queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def drive() -> None:
        try:
            await run(
                agent,
                input,
                model=model,
                tools=tools,
                run_id=run_id,
                checkpoints=checkpoints,
                on_event=queue.put_nowait,
                stream_tokens=stream_tokens,
            )
        except RunFailed:
            pass  # already reported as a RunFailedEvent
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(drive())
    try:
        while (event := await queue.get()) is not None:
            yield event
        await task
    finally:
        if not task.done():
            task.cancel()
