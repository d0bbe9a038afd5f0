"""Executes one run: the agent loop, with every step checkpointed to the database and every
event stored and published in the LangGraph stream shapes the run asked for."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from nimbus.core.agent import Agent
from nimbus.core.checkpoint import RunState, state_from_json, state_to_json
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
from nimbus.core.messages import AssistantMessage, Message, SystemMessage
from nimbus.core.model import Model
from nimbus.core.runtime import AgentRun
from nimbus.core.tool import Tool
from nimbus.exceptions import ConfigError, LeaseLost, NimbusError, RunFailed
from nimbus.ports import Store
from nimbus.records import Assistant, Outcome, Run, StepWrite, ThreadHead
from nimbus.service.agents import AgentFactory, agent_settings, build_agent
from nimbus.service.broker import RunBroker
from nimbus.service.checkpoints import CheckpointChain
from nimbus.service.langgraph import input_messages, thread_messages, to_lg
from nimbus.service.metrics import METRICS

log = structlog.get_logger("nimbus.executor")
TOKEN_MODES = {"messages", "messages-tuple", "events"}
THREAD_STATUS_AFTER = {"success": "idle", "error": "error", "interrupted": "interrupted"}


def stream_modes(kwargs: dict[str, Any]) -> set[str]:
    """The stream modes a run produces: those asked for, plus ``values`` (for wait/join)."""
    modes = kwargs.get("stream_mode") or ["values"]
    if isinstance(modes, str):
        modes = [modes]
    return {*modes, "values"}


@dataclass
class _Emitter:
    """Numbers events, publishes them live and buffers them for the next database write."""

    run_id: str
    broker: RunBroker
    seq: int
    pending: list[tuple[int, str, Any]] = field(default_factory=list)

    def __call__(self, name: str, data: Any) -> None:
        self.seq += 1
        event = (self.seq, name, data)
        self.pending.append(event)
        self.broker.publish(self.run_id, event)

    def take(self) -> list[tuple[int, str, Any]]:
        out, self.pending = self.pending, []
        return out


class RunCheckpoints:
    """CheckpointStore for the core runtime: each save writes the run state, the thread's
    values (a checkpoint in its history) and the buffered events atomically, through the
    database's group-committing :class:`~nimbus.adapters.store.writer.StepWriter`.

    When a save is durable depends on the run's ``durability`` (LangGraph's run option):

    - ``sync``: before the next model or tool call starts. A run resumed after a crash
      repeats no call that had completed.
    - ``async`` (the default): the next call starts while the step is being written. A crash
      in between resumes the run from the step before, so the calls of that one step may be
      repeated, as if the crash had come a moment earlier.
    - ``exit``: steps are not written; the run's end is. A crash restarts the run from its
      input.

    Whatever the mode, a step that asks for a tool that is not idempotent is durable before
    the tool runs, so such a tool is never run again after a crash. The writer keeps each
    run's writes in order, and the run's end waits for all of them (:meth:`flush`).

    The last save of a run (its state finished or failed) is left to
    :meth:`RunExecution.finish`, which writes it together with the run's final status.
    """

    def __init__(self, executor: RunExecution) -> None:
        self.execution = executor
        self.unsafe: frozenset[str] = frozenset()  #: the run's tools that are not idempotent
        self.inflight: list[asyncio.Future[str | None]] = []

    async def save(self, state: RunState) -> None:
        run = self.execution
        if state.status != "running":
            run.unsaved_final = True
            return
        unsafe_next = bool(self.unsafe) and _calls_unsafe(state.messages, self.unsafe)
        if run.durability == "exit" and not unsafe_next:
            run.unsaved_final = True  # the end writes the last state as a checkpoint
            return
        self._check()
        if len(self.inflight) >= MAX_INFLIGHT_STEPS:  # the writer is behind: wait for it
            await self.flush()
        written = run.db.steps.submit(run.step_write(state))
        written.add_done_callback(_retrieve)
        self.inflight.append(written)
        run.saved_any = True
        if run.durability == "sync" or unsafe_next:
            await self.flush()

    def _check(self) -> None:
        """Forget the writes that landed; raise the error of one that failed."""
        while self.inflight and self.inflight[0].done():
            self.inflight.pop(0).result()

    async def flush(self) -> None:
        """Wait until every step saved so far is written; raises what a write raised."""
        if self.inflight:
            await asyncio.shield(self.inflight[-1])  # they are done in order
            self._check()

    async def load(self, run_id: str) -> RunState | None:
        run = await self.execution.db.runs.get_any(run_id)
        return _state_from(run["state"]) if run and run.get("state") else None


MAX_INFLIGHT_STEPS = 4  #: step writes of one run in flight before a save waits for them


def _retrieve(future: asyncio.Future[str | None]) -> None:
    """Mark a write's error seen: a run that stops early never asks for it (it was logged)."""
    if not future.cancelled():
        future.exception()


def _calls_unsafe(messages: list[Message], unsafe: frozenset[str]) -> bool:
    """Whether the last message asks for a tool that is not idempotent."""
    last = messages[-1] if messages else None
    return isinstance(last, AssistantMessage) and any(c.name in unsafe for c in last.tool_calls)


def _state_from(data: Any) -> RunState:
    return state_from_json(orjson.dumps(data))


def _failure(exc: Exception) -> tuple[str, str]:
    """What a run that raised ``exc`` ends with: ``(error message, reason)``. The message is
    for the tenant: a Nimbus error says what went wrong; anything else is logged here, and
    the tenant reads that it was an internal error."""
    if isinstance(exc, RunFailed):
        return str(exc), exc.reason
    if isinstance(exc, ConfigError):
        return str(exc), "invalid_settings"
    if isinstance(exc, NimbusError):
        return str(exc), "error"
    log.exception("run.crashed", error_type=type(exc).__name__)
    return "internal error while running (see the server logs)", "internal_error"


class RunExecution:
    """One attempt at one run.

    Every run ends, whatever raises: :meth:`execute` writes the run's end (``error``, with a
    reason, when anything fails, from building the agent to writing a step) unless the run
    was cancelled, its lease lost or its database unreachable (then it is resumed or ended
    elsewhere, or later). Nothing that can fail happens in the constructor.
    """

    def __init__(
        self,
        db: Store,
        broker: RunBroker,
        agents: AgentFactory,
        run: Run,
        assistant: Assistant,
        thread: ThreadHead,
        last_seq: int,
    ) -> None:
        self.db, self.broker, self.agents = db, broker, agents
        self.run = run
        self.run_id: str = run["run_id"]
        self.tenant_id: str = run["tenant_id"]
        self.thread_id: str = run["thread_id"]
        self.assistant = assistant
        self.thread = thread
        kwargs = run["kwargs"] if isinstance(run.get("kwargs"), dict) else {}
        self.kwargs: dict[str, Any] = kwargs
        self.modes = stream_modes(kwargs)
        # each checkpoint stored as what it adds to the one before (the thread's newest first)
        self.chain = CheckpointChain(thread.get("checkpoint_id"), thread.get("values"))
        self.unsaved_final = False
        self.saved_any = False  # a step of this attempt was written
        self.lease_token: int = run.get("lease_token") or 0
        self.others_waiting = False  # at the end: the thread has other runs waiting
        self.outcome: Outcome | None = None
        self.durability: str = kwargs.get("durability") or "sync"  # runs queued before it
        self.max_state_bytes = agents.max_thread_bytes
        self.checkpoints = RunCheckpoints(self)
        self.emit = _Emitter(self.run_id, broker, last_seq)
        self.agent: Agent | None = None  # built by _prepare()
        self.state = RunState(self.run_id, [])  # the run's state, once _prepare() built it
        self.history: list[tuple[str, Message]] = []
        self._shaped: list[dict[str, Any]] = []  # messages in LangGraph shape (values)
        self._shaped_upto = 0  # how many of the state's messages they stand for
        self.base = 0
        self.system = 0
        self.meta = {
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "assistant_id": run["assistant_id"],
            "graph_id": assistant.get("graph_id"),
        }

    def _prepare(self) -> tuple[Model, list[Tool]]:
        """The agent, its state (as saved by an earlier attempt, or new), model and tools."""
        settings = agent_settings(
            self.assistant.get("config"),
            self.assistant.get("context"),
            self.kwargs.get("config"),
            self.kwargs.get("context"),
        )
        agent = build_agent(self.assistant.get("name") or "", settings, self.agents.models.default)
        self.agent = agent
        self.history = thread_messages(self.thread.get("values"))
        self.base = len(self.history)
        self.system = 1 if agent.instructions else 0
        saved = self.run.get("state")
        model = self.agents.model(agent.model)
        tools = self.agents.tools_for(agent)
        self.checkpoints.unsafe = frozenset(t.name for t in tools if not t.idempotent)
        # a fresh run is saved at its first step: until then it is rebuilt
        self.state = _state_from(saved) if saved else self.initial_state()
        return model, tools

    # ids: messages of the thread keep theirs; the run's are derived from position, so a
    # resumed run names its messages exactly as the first attempt did.
    def message_id(self, index: int) -> str:
        offset = index - self.system  # the system message is not part of the thread values
        if offset < self.base:
            return self.history[offset][0]
        return f"run-{self.run_id}-{offset}"

    def values(self, state: RunState) -> dict[str, Any]:
        """The thread values after ``state``: its messages, in LangGraph shape.

        A run's messages are only ever appended to, and each keeps its place (and so its
        id): each is converted once, not at every step (the whole thread each time)."""
        messages, shaped = state.messages, self._shaped
        if len(messages) < self._shaped_upto:  # not the state seen so far: start over
            shaped.clear()
            self._shaped_upto = 0
        for i in range(self._shaped_upto, len(messages)):
            if not isinstance(messages[i], SystemMessage):
                shaped.append(to_lg(messages[i], self.message_id(i)))
        self._shaped_upto = len(messages)
        return {"messages": list(shaped)}

    def initial_state(self) -> RunState:
        assert self.agent is not None, "prepared"
        messages: list[Message] = [SystemMessage(self.agent.instructions)] if self.system else []
        messages += [m for _, m in self.history]
        messages += input_messages(self.kwargs.get("input"))
        return RunState(self.run_id, messages)

    async def execute(self) -> str:
        """Run to the end and write it; returns the final status (success / error /
        interrupted). Raises only when the run is not this attempt's to end: its lease was
        lost, or it was cancelled (a newer run, a client, the server stopping)."""
        started = time.perf_counter()
        try:
            model, tools = self._prepare()
            assert self.agent is not None
            loop = AgentRun(
                self.agent,
                model,
                tools,
                self.state,
                checkpoints=self.checkpoints,
                on_event=self.on_event,
                stream_tokens=bool(self.modes & TOKEN_MODES),
            )
            await loop.execute()
            await self.finish("success", None, None)
        except LeaseLost:
            raise  # another worker has the run now: nothing more is written from here
        except asyncio.CancelledError:
            if self.agent is not None and not self.run.get("state") and not self.saved_any:
                # Cancelled before its first step was saved (a newer run interrupted it, a
                # client cancelled it, the server is stopping): keep its input in the thread,
                # as a checkpoint of its state so far, for the thread and for a resumed run.
                await self.db.steps.write(self.step_write(self.state))
            raise
        except Exception as exc:
            if self.db.unavailable(exc):
                raise  # the database is away, not the run at fault: the worker decides
            error, reason = _failure(exc)
            await self.finish("error", error, reason)
            METRICS.of(METRICS.runs, "error").inc()
            return "error"
        finally:
            METRICS.run_seconds.observe(time.perf_counter() - started)
        METRICS.of(METRICS.runs, "success").inc()
        return "success"

    def step_write(
        self, state: RunState, end: tuple[str, str | None, str] | None = None
    ) -> StepWrite:
        """The write of ``state`` (with a checkpoint unless it is the run's end and that was
        saved already), and of the events emitted since the last one."""
        data = state_to_json(state)
        checkpoint = end is None or self.unsaved_final
        if checkpoint and len(data) > self.max_state_bytes:
            raise RunFailed(
                f"the thread would grow past {self.max_state_bytes} bytes "
                "(NIMBUS_MAX_THREAD_BYTES); start a new thread",
                reason="thread_too_large",
                run_id=self.run_id,
                step=state.step,
            )
        write = StepWrite(
            self.tenant_id,
            self.run_id,
            self.thread_id,
            orjson.Fragment(data),  # the JSON column's value, serialised once
            step=state.step,
            next_nodes=[] if state.status != "running" else ["agent"],
            events=self.emit.take(),
            end=end,
            lease_token=self.lease_token,
        )
        if checkpoint:
            self.chain.extend(write, self.values(state))
        return write

    async def finish(self, status: str, error: str | None, reason: str | None) -> None:
        """Write the run's end in one go: its status and state, the last checkpoint (when the
        last step was not saved yet), the thread's status and the last events."""
        try:
            await self.checkpoints.flush()  # the steps before the end are all written
        except Exception:
            if status == "success":
                raise  # not a success after all: execute() ends it as an error
            # the run failed anyway (perhaps of this very write): its end is still written
        try:
            write = self.step_write(self.state, (status, error, THREAD_STATUS_AFTER[status]))
        except RunFailed as exc:  # its last state, unsaved till now, is too large to keep
            self.unsaved_final = False
            status, error, reason = "error", str(exc), exc.reason
            write = self.step_write(self.state, (status, error, THREAD_STATUS_AFTER[status]))
        if error is not None:
            self.emit("error", {"error": reason or "RunError", "message": error})
            write.events = [*write.events, *self.emit.take()]
        final = await self.db.steps.write(write) or status
        self.others_waiting = write.others_waiting
        values = write.values
        if values is None:  # the thread's values as the run leaves them
            values = self.values(self.state) if self.agent else self.thread.get("values") or {}
        self.outcome = (final, error, values)

    # --- core events → LangGraph stream parts -------------------------------------------
    def on_event(self, event: Event) -> None:
        modes, emit, state = self.modes, self.emit, self.state
        model_id = self.agent.model if self.agent is not None else ""
        if "events" in modes:
            self._lifecycle(event, model_id)
        if isinstance(event, RunStarted):
            emit("metadata", {"run_id": self.run_id, "attempt": self.run.get("attempts", 1)})
            if "values" in modes:
                emit("values", self.values(state))
        elif isinstance(event, TextDeltaEvent):
            ai_id = self.message_id(len(state.messages))
            chunk = {
                "type": "AIMessageChunk",
                "content": event.text,
                "id": ai_id,
                "tool_call_chunks": [],
                "additional_kwargs": {},
                "response_metadata": {},
            }
            meta = self._node_meta("agent", event.step)
            if "messages-tuple" in modes:
                emit("messages", [chunk, meta])
            if "events" in modes:
                emit(
                    "events",
                    {
                        "event": "on_chat_model_stream",
                        "name": model_id,
                        "run_id": self.run_id,
                        "data": {"chunk": chunk},
                        "metadata": meta,
                        "tags": [],
                        "parent_ids": [],
                    },
                )
        elif isinstance(event, ModelResponded):
            METRICS.of(METRICS.model_seconds, model_id).observe(event.duration_s)
            METRICS.of(METRICS.tokens, model_id, "input").inc(event.usage.input_tokens)
            METRICS.of(METRICS.tokens, model_id, "output").inc(event.usage.output_tokens)
            usage = {
                "input_tokens": event.usage.input_tokens,
                "output_tokens": event.usage.output_tokens,
                "total_tokens": event.usage.total_tokens,
            }
            message = to_lg(event.message, self.message_id(len(state.messages)), usage)
            if "updates" in modes:
                emit("updates", {"agent": {"messages": [message]}})
            if "messages-tuple" in modes and (
                event.message.tool_calls or not event.message.content
            ):
                meta = self._node_meta("agent", event.step)
                emit("messages", [{**message, "type": "AIMessageChunk", "content": ""}, meta])
            if "messages" in modes:
                emit("messages/complete", [message])
            if "debug" in modes:
                emit(
                    "debug",
                    self._debug(
                        "task_result",
                        event.step,
                        {"name": "agent", "result": [["messages", [message]]]},
                    ),
                )
        elif isinstance(event, ToolCallFinished):
            METRICS.of(METRICS.tool_seconds, event.result.name).observe(event.duration_s)
            if event.result.is_error:
                METRICS.of(METRICS.tool_errors, event.result.name).inc()
            message = to_lg(event.result, self.message_id(len(state.messages) - 1))
            if "updates" in modes:
                emit("updates", {"tools": {"messages": [message]}})
            if "messages-tuple" in modes:
                emit(
                    "messages",
                    [
                        message,
                        self._node_meta("tools", event.step),
                    ],
                )
            if "messages" in modes:
                emit("messages/complete", [message])
        elif isinstance(event, StepFinished):
            METRICS.steps.inc()
            if "values" in modes:
                emit("values", self.values(state))
            if "debug" in modes:
                emit("debug", self._debug("checkpoint", event.step, {"values": self.values(state)}))
        elif isinstance(event, RunFailedEvent):
            pass  # reported by finish()

    def _lifecycle(self, event: Event, model_id: str) -> None:
        """``stream_mode="events"``: the start and end of the graph, of each node (``agent``,
        ``tools``), of each model call and of each tool call, in LangChain's astream_events
        shape (the model's tokens are its ``on_chat_model_stream`` events)."""
        state = self.state
        if isinstance(event, RunStarted):
            self._ev("on_chain_start", "LangGraph", {"input": self.kwargs.get("input")})
        elif isinstance(event, ModelRequested):
            self._ev("on_chain_start", "agent", {}, event.step, "agent")
            messages = self.values(state)["messages"]
            started = {"input": {"messages": [messages]}}
            self._ev("on_chat_model_start", model_id, started, event.step, "agent")
        elif isinstance(event, ModelResponded):
            message = to_lg(event.message, self.message_id(len(state.messages)))
            self._ev("on_chat_model_end", model_id, {"output": message}, event.step, "agent")
            update = {"messages": [message]}
            self._ev("on_chain_end", "agent", {"output": update}, event.step, "agent")
        elif isinstance(event, ToolCallStarted):
            call = event.call
            arguments = {"input": _arguments(call.arguments)}
            self._ev("on_tool_start", call.name, arguments, event.step, "tools")
        elif isinstance(event, ToolCallFinished):
            message = to_lg(event.result, self.message_id(len(state.messages) - 1))
            self._ev("on_tool_end", event.result.name, {"output": message}, event.step, "tools")
        elif isinstance(event, RunFinished | RunFailedEvent):
            self._ev("on_chain_end", "LangGraph", {"output": self.values(state)})

    def _node_meta(self, node: str, step: int | None) -> dict[str, Any]:
        """The run's metadata as an event of one node's step carries it."""
        return {**self.meta, "langgraph_node": node, "langgraph_step": step}

    def _ev(
        self,
        kind: str,
        name: str,
        data: dict[str, Any],
        step: int | None = None,
        node: str | None = None,
    ) -> None:
        meta = self.meta if node is None else self._node_meta(node, step)
        self.emit(
            "events",
            {
                "event": kind,
                "name": name,
                "run_id": self.run_id,
                "data": data,
                "metadata": meta,
                "tags": [],
                "parent_ids": [],
            },
        )

    def _debug(self, kind: str, step: int, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": kind,
            "timestamp": datetime.now(UTC).isoformat(),
            "step": step,
            "payload": payload,
        }


def _arguments(text: str) -> Any:
    """A tool call's arguments as JSON (the text itself when it is not JSON)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def final_answer(values: dict[str, Any]) -> AssistantMessage | None:
    """The last AI message of thread values, if any."""
    for m in reversed(values.get("messages", [])):
        if m.get("type") == "ai":
            return AssistantMessage(m.get("content") or "")
    return None
