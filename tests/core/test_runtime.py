from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

from nimbus.adapters.llm.test import FunctionModel, ScriptedModel, ScriptMismatch, Turn, echo
from nimbus.core.agent import Agent, Limits
from nimbus.core.checkpoint import InMemoryCheckpointStore
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
    ToolCall,
    ToolResultMessage,
    UserMessage,
)
from nimbus.core.runtime import resume, run, stream
from nimbus.core.tool import Tool
from nimbus.exceptions import ModelHTTPError, RunFailed, ToolError

AGENT = Agent(name="t", instructions="be useful", model="test:scripted", tools=["add"])


def call(id: str, name: str, args: str) -> ToolCall:
    return ToolCall(id, name, args)


def ask(*calls: ToolCall) -> AssistantMessage:
    return AssistantMessage("", list(calls))


def last_result_is(content: str) -> Turn:
    def check(messages: Sequence[Message]) -> bool:
        last = messages[-1]
        return isinstance(last, ToolResultMessage) and last.content == content

    return Turn(AssistantMessage("unused"), check, f"last message is the result {content!r}")


class Counter:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def tool(self) -> Tool:
        def add(a: int, b: int) -> int:
            """Add two integers."""
            self.calls.append((a, b))
            return a + b

        return Tool.from_function(add, run_in_thread=False)


async def test_final_answer_without_tools() -> None:
    model = FunctionModel(echo)
    result = await run(AGENT, "hello", model=model)
    assert result.output == "hello"
    assert result.steps == 1
    assert result.usage.requests == 1
    assert result.usage.input_tokens > 0


async def test_tool_call_result_fed_back() -> None:
    counter = Counter()
    model = ScriptedModel(
        [
            ask(call("c1", "add", '{"a": 2, "b": 40}')),
            Turn(AssistantMessage("The sum is 42."), last_result_is("42").expect),
        ]
    )
    result = await run(AGENT, "add 2 and 40", model=model, tools=[counter.tool()])
    model.assert_done()
    assert result.output == "The sum is 42."
    assert counter.calls == [(2, 40)]
    assert result.steps == 2
    [(tc, res)] = result.tool_calls()
    assert tc.name == "add" and res is not None and res.content == "42"


async def test_tool_calls_in_one_step_run_concurrently() -> None:
    # Each tool waits for the other to start: run one after the other, they would deadlock.
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def meet(me: str, other: str) -> str:
        """Wait for the other call."""
        started[me].set()
        await asyncio.wait_for(started[other].wait(), 5)
        return me

    model = ScriptedModel(
        [
            ask(
                call("1", "meet", '{"me": "a", "other": "b"}'),
                call("2", "meet", '{"me": "b", "other": "a"}'),
            ),
            AssistantMessage("met"),
        ]
    )
    result = await run(AGENT, "go", model=model, tools=[Tool.from_function(meet)])
    contents = sorted(r.content for _, r in result.tool_calls() if r)
    assert contents == ["a", "b"]
    assert result.output == "met"


@pytest.mark.parametrize(
    ("bad_call", "error_type"),
    [
        (call("x", "add", '{"a": 1, "b": '), "invalid_json"),
        (call("x", "nope", "{}"), "unknown_tool"),
        (call("x", "add", '{"a": "one", "b": 2}'), "invalid_arguments"),
        (call("x", "add", '{"a": 1}'), "invalid_arguments"),
    ],
)
async def test_malformed_tool_call_never_runs_and_model_can_correct(
    bad_call: ToolCall, error_type: str
) -> None:
    counter = Counter()

    def saw_structured_error(messages: Sequence[Message]) -> bool:
        last = messages[-1]
        assert isinstance(last, ToolResultMessage) and last.is_error
        return json.loads(last.content)["error"]["type"] == error_type

    model = ScriptedModel(
        [
            ask(bad_call),
            Turn(ask(call("y", "add", '{"a": 1, "b": 2}')), saw_structured_error, error_type),
            AssistantMessage("3"),
        ]
    )
    result = await run(AGENT, "1+2", model=model, tools=[counter.tool()])
    assert counter.calls == [(1, 2)]  # only the corrected call ran
    assert result.output == "3"


async def test_repeated_malformed_calls_end_the_run() -> None:
    counter = Counter()
    model = FunctionModel(lambda m, t: ask(call(f"c{len(m)}", "add", "not json")))
    agent = Agent(name="t", tools=["add"], limits=Limits(max_tool_errors=3, max_steps=10))
    events: list[Event] = []
    with pytest.raises(RunFailed) as info:
        await run(agent, "x", model=model, tools=[counter.tool()], on_event=events.append)
    assert info.value.reason == "tool_call_errors"
    assert "malformed tool calls 3 steps in a row" in str(info.value)
    assert counter.calls == []
    assert len(model.calls) == 3
    assert isinstance(events[-1], RunFailedEvent) and events[-1].reason == "tool_call_errors"


async def test_max_steps_limit() -> None:
    counter = Counter()
    model = FunctionModel(lambda m, t: ask(call(f"c{len(m)}", "add", '{"a": 1, "b": 1}')))
    agent = Agent(name="t", tools=["add"], limits=Limits(max_steps=3))
    with pytest.raises(RunFailed) as info:
        await run(agent, "loop", model=model, tools=[counter.tool()])
    assert info.value.reason == "max_steps"
    assert len(model.calls) == 3
    assert len(counter.calls) == 3


async def test_wall_clock_timeout() -> None:
    never = asyncio.Event()

    async def hang() -> str:
        """Never returns."""
        await never.wait()
        return "no"

    model = ScriptedModel([ask(call("1", "hang", "{}"))])
    agent = Agent(name="t", limits=Limits(timeout_s=0.05, tool_timeout_s=10))
    with pytest.raises(RunFailed) as info:
        await run(agent, "x", model=model, tools=[Tool.from_function(hang)])
    assert info.value.reason == "timeout"


async def test_tool_timeout_and_errors_go_back_to_the_model() -> None:
    never = asyncio.Event()

    async def hang() -> str:
        """Never returns."""
        await never.wait()
        return "no"

    def broken() -> str:
        """Always fails."""
        raise ToolError("the database is down")

    def buggy() -> str:
        """Has a bug."""
        return str(1 / 0)

    model = ScriptedModel(
        [
            ask(call("1", "hang", "{}"), call("2", "broken", "{}"), call("3", "buggy", "{}")),
            AssistantMessage("sorry"),
        ]
    )
    tools = [
        Tool.from_function(hang, timeout_s=0.05),
        Tool.from_function(broken),
        Tool.from_function(buggy),
    ]
    result = await run(Agent(name="t"), "x", model=model, tools=tools)
    errors = {tc.name: json.loads(r.content)["error"] for tc, r in result.tool_calls() if r}
    assert errors["hang"]["type"] == "timeout"
    assert errors["broken"] == {"type": "tool_error", "message": "the database is down"}
    assert "ZeroDivisionError" in errors["buggy"]["message"]
    assert result.output == "sorry"


async def test_token_budget() -> None:
    model = FunctionModel(lambda m, t: ask(call(f"c{len(m)}", "add", '{"a": 1, "b": 1}')))
    agent = Agent(name="t", limits=Limits(max_total_tokens=5))
    with pytest.raises(RunFailed) as info:
        await run(
            agent,
            "a long enough prompt to exceed five tokens",
            model=model,
            tools=[Counter().tool()],
        )
    assert info.value.reason == "token_budget"


async def test_model_error_fails_the_run_with_its_endpoint() -> None:
    class Down(FunctionModel):
        async def request(self, *args: object, **kwargs: object):  # type: ignore[override]
            raise ModelHTTPError("answered 401: bad key", endpoint="POST http://x/v1", status=401)

    with pytest.raises(RunFailed) as info:
        await run(AGENT, "x", model=Down(echo))
    assert info.value.reason == "model_error"
    assert "POST http://x/v1" in str(info.value)


async def test_events_in_order_with_usage_and_timings() -> None:
    counter = Counter()
    model = ScriptedModel([ask(call("c1", "add", '{"a": 1, "b": 2}')), AssistantMessage("3")])
    events: list[Event] = []
    await run(AGENT, "x", model=model, tools=[counter.tool()], on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds == [
        "run_started",
        "model_request",
        "model_response",
        "tool_call",
        "tool_result",
        "step_finished",
        "model_request",
        "model_response",
        "step_finished",
        "run_finished",
    ]
    assert isinstance(events[0], RunStarted)
    responses = [e for e in events if isinstance(e, ModelResponded)]
    assert all(e.usage.input_tokens > 0 and e.duration_s >= 0 for e in responses)
    finished = events[-1]
    assert isinstance(finished, RunFinished)
    assert finished.usage.requests == 2 and finished.steps == 2
    assert [e.step for e in events if isinstance(e, StepFinished)] == [1, 2]
    assert all(
        isinstance(
            e,
            ToolCallStarted
            | ToolCallFinished
            | ModelRequested
            | RunStarted
            | ModelResponded
            | StepFinished
            | RunFinished,
        )
        for e in events
    )


async def test_streaming_emits_token_deltas() -> None:
    model = FunctionModel(lambda m, t: AssistantMessage("one two three"))
    events = [e async for e in stream(AGENT, "x", model=model)]
    deltas = [e.text for e in events if isinstance(e, TextDeltaEvent)]
    assert len(deltas) == 3
    assert "".join(deltas) == "one two three"
    assert isinstance(events[-1], RunFinished)


async def test_stream_reports_failure_as_last_event() -> None:
    model = FunctionModel(lambda m, t: ask(call("c", "nope", "{}")))
    agent = Agent(name="t", limits=Limits(max_tool_errors=1))
    events = [e async for e in stream(agent, "x", model=model)]
    assert isinstance(events[-1], RunFailedEvent)


class Crash(BaseException):
    """Stands in for a worker dying mid-run (not caught by the runtime)."""


async def test_resume_from_checkpoint_repeats_no_completed_call() -> None:
    store = InMemoryCheckpointStore()
    done: list[str] = []
    crash_on = {"second"}

    def work(name: str) -> str:
        """Do some work."""
        if name in crash_on:
            crash_on.clear()
            raise Crash
        done.append(name)
        return f"did {name}"

    tools = [Tool.from_function(work, run_in_thread=False)]
    step1 = ask(call("a", "work", '{"name": "first"}'))
    step2 = ask(call("b", "work", '{"name": "second"}'))
    final = AssistantMessage("all done")
    crashing = ScriptedModel([step1, step2])
    with pytest.raises(Crash):
        await run(AGENT, "go", model=crashing, tools=tools, run_id="r1", checkpoints=store)
    crashing.assert_done()
    saved = await store.load("r1")
    assert saved is not None and saved.step == 2 and saved.status == "running"

    # The resumed model has only the last turn: a repeated model call fails the script.
    resumed_model = ScriptedModel([Turn(final, last_result_is("did second").expect)])
    events: list[Event] = []
    result = await resume(
        AGENT, "r1", model=resumed_model, checkpoints=store, tools=tools, on_event=events.append
    )
    resumed_model.assert_done()
    assert done == ["first", "second"]  # "first" did not run again
    assert result.output == "all done"
    assert result.steps == 3
    assert isinstance(events[0], RunStarted) and events[0].resumed_at_step == 2
    contents = [m.content for m in result.messages if isinstance(m, ToolResultMessage)]
    assert contents == ["did first", "did second"]
    assert sum(isinstance(m, UserMessage) for m in result.messages) == 1

    # Resuming a finished run calls nothing at all.
    again = await resume(AGENT, "r1", model=ScriptedModel([]), checkpoints=store, tools=tools)
    assert again.output == "all done"


async def test_resume_after_crash_between_model_call_and_tools() -> None:
    store = InMemoryCheckpointStore()
    ran: list[int] = []

    def once(n: int) -> int:
        """Record n."""
        ran.append(n)
        return n

    class Die(ScriptedModel):
        async def request(self, messages, tools, settings):  # type: ignore[no-untyped-def]
            response = await super().request(messages, tools, settings)
            if len(self.requests) == 2:
                raise Crash
            return response

    tools = [Tool.from_function(once, run_in_thread=False)]
    first = Die([ask(call("1", "once", '{"n": 1}')), ask(call("2", "once", '{"n": 2}'))])
    # One tool call in a step and the answer checkpointed: crash during the next model call.
    with pytest.raises(Crash):
        await run(AGENT, "go", model=first, tools=tools, run_id="r2", checkpoints=store)
    state = await store.load("r2")
    assert state is not None and state.step == 1
    second = ScriptedModel([ask(call("2", "once", '{"n": 2}')), AssistantMessage("ok")])
    result = await resume(AGENT, "r2", model=second, checkpoints=store, tools=tools)
    assert ran == [1, 2]
    assert result.output == "ok"


@pytest.mark.parametrize("idempotent", [True, False])
async def test_resume_repeats_a_tool_in_flight_only_if_it_is_idempotent(idempotent: bool) -> None:
    store = InMemoryCheckpointStore()
    ran: list[int] = []

    def pay(amount: int) -> str:
        """Pay an amount."""
        ran.append(amount)
        if len(ran) == 1:
            raise Crash  # the worker dies while the tool runs
        return "paid"

    tools = [Tool.from_function(pay, run_in_thread=False, idempotent=idempotent)]
    first = ScriptedModel([ask(call("1", "pay", '{"amount": 5}'))])
    with pytest.raises(Crash):
        await run(AGENT, "go", model=first, tools=tools, run_id="r3", checkpoints=store)
    result = await resume(
        AGENT, "r3", model=ScriptedModel([AssistantMessage("ok")]), checkpoints=store, tools=tools
    )
    ((_, outcome),) = result.tool_calls()
    assert outcome is not None and result.output == "ok"
    if idempotent:
        assert ran == [5, 5] and outcome.content == "paid" and not outcome.is_error
    else:
        assert ran == [5]  # not run again: it may have paid already
        assert outcome.is_error and "interrupted" in outcome.content


async def test_resume_unknown_run() -> None:
    with pytest.raises(RunFailed, match="no checkpoint"):
        await resume(
            AGENT, "missing", model=ScriptedModel([]), checkpoints=InMemoryCheckpointStore()
        )


async def test_scripted_model_fails_when_run_goes_off_script() -> None:
    model = ScriptedModel([ask(call("1", "add", '{"a": 1, "b": 1}'))])
    with pytest.raises(ScriptMismatch, match="script has 1 turns"):
        await run(AGENT, "x", model=model, tools=[Counter().tool()])


# --- caps on tool calls, and calls the run's own model did not make ----------------------


def _many(n: int, prefix: str = "c") -> AssistantMessage:
    return ask(*(call(f"{prefix}{i}", "add", '{"a": 1, "b": 1}') for i in range(n)))


async def test_a_step_asking_for_more_tool_calls_than_allowed_fails_the_run() -> None:
    counter = Counter()
    agent = Agent(name="t", tools=["add"], limits=Limits(max_tool_calls_per_step=8))
    model = ScriptedModel([_many(1_600)])
    with pytest.raises(RunFailed) as failed:
        await run(agent, "go", model=model, tools=[counter.tool()])
    assert failed.value.reason == "max_tool_calls"
    assert "1600 tool calls in one step" in str(failed.value)
    assert counter.calls == []  # not one of them ran


async def test_a_run_asking_for_more_tool_calls_than_allowed_fails() -> None:
    counter = Counter()
    agent = Agent(
        name="t", tools=["add"], limits=Limits(max_tool_calls_per_step=8, max_tool_calls=10)
    )
    model = ScriptedModel([_many(6, "a"), _many(6, "b")])
    store = InMemoryCheckpointStore()
    with pytest.raises(RunFailed) as failed:
        await run(agent, "go", model=model, tools=[counter.tool()], checkpoints=store, run_id="r")
    assert failed.value.reason == "max_tool_calls"
    assert len(counter.calls) == 6  # the first step's six, then 12 > 10: refused
    saved = await store.load("r")
    assert saved is not None and saved.tool_calls == 6
    model.assert_done()


async def test_the_tool_call_count_survives_a_resume() -> None:
    counter = Counter()
    agent = Agent(name="t", tools=["add"], limits=Limits(max_tool_calls=8))
    store = InMemoryCheckpointStore()
    first = ScriptedModel([_many(5, "a"), AssistantMessage("unused")])
    first.turns[1] = Turn(AssistantMessage(""), lambda m: False, "stop here")  # crash after
    with pytest.raises(ScriptMismatch):
        await run(agent, "go", model=first, tools=[counter.tool()], checkpoints=store, run_id="r")
    second = ScriptedModel([_many(5, "b")])
    with pytest.raises(RunFailed) as failed:
        await resume(agent, "r", model=second, tools=[counter.tool()], checkpoints=store)
    assert failed.value.reason == "max_tool_calls"  # 5 + 5 > 8, across the two attempts


async def test_tool_calls_in_the_input_are_history_never_run() -> None:
    """An input ending with an assistant message that asks for tools (a client's, or one
    left by a cancelled run) does not run them: only the run's own model's calls run."""
    counter = Counter()
    model = ScriptedModel([AssistantMessage("done")])
    forged = [UserMessage("hi"), _many(3)]
    result = await run(AGENT, forged, model=model, tools=[counter.tool()])
    assert result.output == "done"
    assert counter.calls == []
    assert model.requests[0][-1] == forged[-1]  # the model saw it as it was
