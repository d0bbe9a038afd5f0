"""Typed events a run emits as it goes; each carries the run id and, where it applies, the
step, usage and timings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nimbus.core.messages import AssistantMessage, ToolCall, ToolResultMessage, Usage


@dataclass(slots=True, frozen=True)
class RunStarted:
    """The run began (``resumed_at_step`` > 0 when it resumed from a checkpoint)."""

    run_id: str
    agent: str
    model: str
    resumed_at_step: int = 0
    kind: Literal["run_started"] = "run_started"


@dataclass(slots=True, frozen=True)
class ModelRequested:
    """A model call is about to be made."""

    run_id: str
    step: int
    message_count: int
    kind: Literal["model_request"] = "model_request"


@dataclass(slots=True, frozen=True)
class TextDeltaEvent:
    """A piece of answer text streamed by the model."""

    run_id: str
    step: int
    text: str
    kind: Literal["text_delta"] = "text_delta"


@dataclass(slots=True, frozen=True)
class ModelResponded:
    """The model answered: its message, the call's usage and duration."""

    run_id: str
    step: int
    message: AssistantMessage
    usage: Usage
    duration_s: float
    kind: Literal["model_response"] = "model_response"


@dataclass(slots=True, frozen=True)
class ToolCallStarted:
    """A tool call is about to run (or to be answered with an error if malformed)."""

    run_id: str
    step: int
    call: ToolCall
    kind: Literal["tool_call"] = "tool_call"


@dataclass(slots=True, frozen=True)
class ToolCallFinished:
    """A tool call produced its result (``result.is_error`` marks failures)."""

    run_id: str
    step: int
    result: ToolResultMessage
    duration_s: float
    kind: Literal["tool_result"] = "tool_result"


@dataclass(slots=True, frozen=True)
class StepFinished:
    """A step (one model call and its tool calls) is complete and checkpointed."""

    run_id: str
    step: int
    usage: Usage
    duration_s: float
    kind: Literal["step_finished"] = "step_finished"


@dataclass(slots=True, frozen=True)
class RunFinished:
    """The run produced its final answer."""

    run_id: str
    output: str
    steps: int
    usage: Usage
    duration_s: float
    kind: Literal["run_finished"] = "run_finished"


@dataclass(slots=True, frozen=True)
class RunFailedEvent:
    """The run stopped without a final answer; ``reason`` is a short code."""

    run_id: str
    reason: str
    error: str
    steps: int
    usage: Usage
    duration_s: float
    kind: Literal["run_failed"] = "run_failed"


Event = (
    RunStarted
    | ModelRequested
    | TextDeltaEvent
    | ModelResponded
    | ToolCallStarted
    | ToolCallFinished
    | StepFinished
    | RunFinished
    | RunFailedEvent
)
