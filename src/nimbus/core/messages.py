"""The provider-neutral message format.

Messages are plain dataclasses tagged with a ``kind`` literal; one pydantic ``TypeAdapter``
turns them into JSON and back without loss (:func:`messages_to_json`, :func:`messages_from_json`).
Providers translate to and from their wire formats at their own edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter


@dataclass(slots=True)
class Usage:
    """Tokens consumed by one model call, or summed over a run."""

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        """Accumulate ``other`` into this usage."""
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.requests += other.requests


@dataclass(slots=True)
class ToolCall:
    """A tool call the model asked for; ``arguments`` is the raw JSON text it produced."""

    id: str
    name: str
    arguments: str = "{}"


@dataclass(slots=True)
class SystemMessage:
    """Instructions for the model."""

    content: str
    kind: Literal["system"] = "system"


@dataclass(slots=True)
class UserMessage:
    """What the user said."""

    content: str
    kind: Literal["user"] = "user"


@dataclass(slots=True)
class AssistantMessage:
    """What the model answered: text, tool calls, or both."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    kind: Literal["assistant"] = "assistant"


@dataclass(slots=True)
class ToolResultMessage:
    """The result of one tool call, fed back to the model (``is_error`` marks failures)."""

    tool_call_id: str
    name: str
    content: str
    is_error: bool = False
    kind: Literal["tool"] = "tool"


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolResultMessage,
    Field(discriminator="kind"),
]

_MESSAGES: TypeAdapter[list[Message]] = TypeAdapter(list[Message])


def messages_to_json(messages: Sequence[Message]) -> bytes:
    """Serialise messages to JSON bytes."""
    return _MESSAGES.dump_json(list(messages))


def messages_from_json(data: str | bytes) -> list[Message]:
    """Parse messages from JSON produced by :func:`messages_to_json` (or any client)."""
    return _MESSAGES.validate_json(data)


def messages_to_python(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as JSON-compatible dicts."""
    data: list[dict[str, Any]] = _MESSAGES.dump_python(list(messages), mode="json")
    return data


def messages_from_python(data: Any) -> list[Message]:
    """Validate JSON-compatible data (a list of dicts) into messages."""
    return _MESSAGES.validate_python(data)
