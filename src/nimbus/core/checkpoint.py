"""Run state and checkpoints: the state after every completed model or tool call can be
saved, and a run resumed from it without repeating what completed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import TypeAdapter

from nimbus.core.messages import Message, Usage

RunStatus = Literal["running", "finished", "failed"]


@dataclass(slots=True)
class RunState:
    """Everything needed to resume a run.

    ``step`` counts completed model calls, ``tool_calls`` the tool calls they asked for (the
    messages hold the thread's earlier runs too, so this is not derived from them). Tool calls
    still owed are derived from the messages (calls of the last assistant message without a
    result), never stored twice.
    """

    run_id: str
    messages: list[Message]
    step: int = 0
    usage: Usage = field(default_factory=Usage)
    tool_error_streak: int = 0
    tool_calls: int = 0
    status: RunStatus = "running"
    output: str | None = None
    error: str | None = None


_STATE: TypeAdapter[RunState] = TypeAdapter(RunState)


def state_to_json(state: RunState) -> bytes:
    """Serialise a run state to JSON bytes."""
    return _STATE.dump_json(state)


def state_from_json(data: str | bytes) -> RunState:
    """Parse a run state from :func:`state_to_json` output."""
    return _STATE.validate_json(data)


class CheckpointStore(Protocol):
    """Where run states are saved at every step boundary."""

    async def save(self, state: RunState) -> None:
        """Persist ``state`` (replacing the previous checkpoint of its run)."""
        ...

    async def load(self, run_id: str) -> RunState | None:
        """The latest checkpoint of ``run_id``, or ``None``."""
        ...


class InMemoryCheckpointStore:
    """A checkpoint store in memory; states are kept as JSON so nothing is shared by reference."""

    def __init__(self) -> None:
        self._states: dict[str, bytes] = {}
        self.saves = 0

    async def save(self, state: RunState) -> None:
        """Keep a serialised copy of ``state``."""
        self._states[state.run_id] = state_to_json(state)
        self.saves += 1

    async def load(self, run_id: str) -> RunState | None:
        """A fresh copy of the latest state of ``run_id``."""
        data = self._states.get(run_id)
        return None if data is None else state_from_json(data)
