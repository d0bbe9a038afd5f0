from __future__ import annotations

import pytest

from nimbus.core.checkpoint import RunState, state_from_json, state_to_json
from nimbus.core.messages import (
    AssistantMessage,
    SystemMessage,
    ToolCall,
    ToolResultMessage,
    Usage,
    UserMessage,
    messages_from_json,
    messages_from_python,
    messages_to_json,
    messages_to_python,
)

CONVERSATION = [
    SystemMessage("Be brief. ünïcödé ✓"),
    UserMessage('What is 6 * 7? "quoted"\nnew line'),
    AssistantMessage(
        "",
        [
            ToolCall("c1", "calculator", '{"expression": "6 * 7"}'),
            ToolCall("c2", "current_time", "{}"),
        ],
    ),
    ToolResultMessage("c1", "calculator", "42"),
    ToolResultMessage("c2", "current_time", '{"error": "x"}', is_error=True),
    AssistantMessage("It is 42."),
]


def test_json_round_trip_is_lossless() -> None:
    data = messages_to_json(CONVERSATION)
    assert messages_from_json(data) == CONVERSATION
    assert messages_from_python(messages_to_python(CONVERSATION)) == CONVERSATION


def test_kinds_are_tagged() -> None:
    kinds = [m["kind"] for m in messages_to_python(CONVERSATION)]
    assert kinds == ["system", "user", "assistant", "tool", "tool", "assistant"]


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        messages_from_python([{"kind": "robot", "content": "x"}])


def test_run_state_round_trip() -> None:
    state = RunState("r1", list(CONVERSATION), step=2, usage=Usage(10, 5, 2), tool_error_streak=1)
    assert state_from_json(state_to_json(state)) == state


def test_usage_adds_up() -> None:
    total = Usage()
    total.add(Usage(3, 4, 1))
    total.add(Usage(10, 1, 1))
    assert (total.input_tokens, total.output_tokens, total.requests, total.total_tokens) == (
        13,
        5,
        2,
        18,
    )
