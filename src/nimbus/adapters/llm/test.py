"""Deterministic models for tests and examples: no network, no randomness.

- :class:`FunctionModel` answers with whatever a Python function returns.
- :class:`ScriptedModel` plays a fixed script of answers, records every request, and fails
  loudly when the run and the script disagree (more calls than scripted, or an expectation
  about the conversation that does not hold).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from nimbus.core.messages import AssistantMessage, Message, ToolResultMessage, Usage, UserMessage
from nimbus.core.model import Model, ModelResponse, ModelSettings, TextDelta, ToolSpec

AnswerFunction = Callable[[Sequence[Message], Sequence[ToolSpec]], AssistantMessage]


def _estimate_tokens(messages: Sequence[Message]) -> int:
    return sum(len(getattr(m, "content", "") or "") for m in messages) // 4 + 1


def _respond(
    message: AssistantMessage, messages: Sequence[Message], model_id: str
) -> ModelResponse:
    usage = Usage(_estimate_tokens(messages), len(message.content) // 4 + 1, 1)
    reason = "tool_calls" if message.tool_calls else "stop"
    return ModelResponse(message, usage, model_id, reason)


class FunctionModel(Model):
    """A model whose answers come from ``function(messages, tools)``; streams word by word."""

    def __init__(self, function: AnswerFunction, *, model_id: str = "test:function") -> None:
        self.function = function
        self.model_id = model_id
        self.calls: list[list[Message]] = []

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> ModelResponse:
        """Record the conversation and answer with the function's message."""
        self.calls.append(list(messages))
        return _respond(self.function(messages, tools), messages, self.model_id)

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ModelResponse]:
        """Yield the answer's words as deltas, then the response."""
        response = await self.request(messages, tools, settings)
        text = response.message.content
        start = 0
        while start < len(text):
            end = text.find(" ", start + 1)
            end = len(text) if end == -1 else end
            yield TextDelta(text[start:end])
            start = end
        yield response


def echo(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> AssistantMessage:
    """Answer with the last user message (or the last tool result)."""
    for m in reversed(messages):
        if isinstance(m, UserMessage | ToolResultMessage):
            return AssistantMessage(m.content)
    return AssistantMessage("")


class ScriptMismatch(AssertionError):
    """The run and the script of a :class:`ScriptedModel` disagree."""


Expectation = Callable[[Sequence[Message]], bool]


@dataclass(slots=True)
class Turn:
    """One scripted answer, and optionally what the conversation must satisfy before it."""

    answer: AssistantMessage
    expect: Expectation | None = None
    why: str = ""


@dataclass
class ScriptedModel(Model):
    """Plays ``turns`` in order; raises :class:`ScriptMismatch` when the run goes off script."""

    turns: list[Turn | AssistantMessage]
    model_id: str = "test:scripted"
    requests: list[list[Message]] = field(default_factory=list)

    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> ModelResponse:
        """Check the next turn's expectation and return its answer."""
        index = len(self.requests)
        self.requests.append(list(messages))
        if index >= len(self.turns):
            raise ScriptMismatch(
                f"model called {index + 1} times but the script has {len(self.turns)} turns"
            )
        turn = self.turns[index]
        if isinstance(turn, AssistantMessage):
            turn = Turn(turn)
        if turn.expect is not None and not turn.expect(messages):
            raise ScriptMismatch(f"turn {index + 1}: expectation failed: {turn.why or turn.expect}")
        return _respond(turn.answer, messages, self.model_id)

    def assert_done(self) -> None:
        """Fail unless every scripted turn was used."""
        if len(self.requests) != len(self.turns):
            raise ScriptMismatch(
                f"script has {len(self.turns)} turns but the model was called "
                f"{len(self.requests)} times"
            )
