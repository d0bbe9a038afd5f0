"""The model interface: one required async ``request()``; streaming optional."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from nimbus.core.messages import AssistantMessage, Message, Usage

MAX_MODEL_ID = 200  #: the longest model id (``provider:name``) anything may name


@dataclass(slots=True, frozen=True)
class ToolSpec:
    """What a model is told about a tool: its name, description and JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ModelSettings:
    """Per-request generation settings."""

    max_tokens: int | None = None
    temperature: float | None = None


@dataclass(slots=True)
class ModelResponse:
    """One complete model answer."""

    message: AssistantMessage
    usage: Usage
    model_name: str = ""
    finish_reason: str | None = None


@dataclass(slots=True, frozen=True)
class TextDelta:
    """A piece of answer text, streamed as the model produces it."""

    text: str


class Model(ABC):
    """A language model: provider adapters implement :meth:`request` (and may stream)."""

    #: The id this model was resolved from, e.g. ``openai:gpt-4o-mini``.
    model_id: str = ""

    @abstractmethod
    async def request(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> ModelResponse:
        """Send the conversation and return the model's complete answer."""

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], settings: ModelSettings
    ) -> AsyncIterator[TextDelta | ModelResponse]:
        """Yield text deltas as they arrive, then the complete :class:`ModelResponse`.

        The default does not stream: it yields the whole text at once.
        """
        response = await self.request(messages, tools, settings)
        if response.message.content:
            yield TextDelta(response.message.content)
        yield response

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections or other resources held by the model."""
