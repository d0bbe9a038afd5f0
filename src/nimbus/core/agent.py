"""Agent specs: an agent is data (name, instructions, model id, tools, limits).

Loadable from YAML, TOML or JSON files and from plain dicts; validated by pydantic at this
edge so a bad file gives one clear :class:`~nimbus.exceptions.ConfigError`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from nimbus.exceptions import ConfigError

DEFAULT_MODEL = "local:smollm2"
DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Answer briefly and accurately."


@dataclass(slots=True)
class Limits:
    """Safety limits of one run; all on by default.

    ``max_tokens`` caps each model response; ``max_total_tokens`` is the run's token budget;
    ``max_tool_errors`` is how many steps in a row may consist only of malformed tool calls;
    ``max_tool_calls_per_step`` and ``max_tool_calls`` cap the tool calls the model may ask
    for in one step and in the whole run (a step asking for more fails the run: one model
    reply must not fan out into an unbounded number of tool runs).
    """

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    max_steps: int = 10
    max_tokens: int | None = 1024
    max_total_tokens: int | None = 200_000
    timeout_s: float = 300.0
    tool_timeout_s: float = 30.0
    max_tool_errors: int = 3
    max_tool_calls_per_step: int = 32
    max_tool_calls: int = 128

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.timeout_s <= 0 or self.tool_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_tool_errors < 1:
            raise ValueError("max_tool_errors must be at least 1")
        if self.max_tool_calls_per_step < 1 or self.max_tool_calls < 1:
            raise ValueError("max_tool_calls_per_step and max_tool_calls must be at least 1")


@dataclass(slots=True)
class Agent:
    """An agent spec: what to run, not how. Tools are referred to by name."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid")

    name: str = "assistant"
    instructions: str = DEFAULT_INSTRUCTIONS
    model: str = DEFAULT_MODEL
    tools: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    temperature: float | None = None
    description: str = ""

    @classmethod
    def from_dict(cls, data: Any) -> Agent:
        """Validate a dict (e.g. parsed JSON) into an agent; errors say which field is wrong."""
        try:
            return _AGENT.validate_python(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid agent spec: {_describe(exc)}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Agent:
        """Parse an agent from JSON text."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"invalid agent JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-compatible data."""
        result: dict[str, Any] = _AGENT.dump_python(self, mode="json")
        return result


_AGENT: TypeAdapter[Agent] = TypeAdapter(Agent)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_agent(path: str | Path) -> Agent:
    """Load an agent spec from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read agent file {str(p)!r}: {exc.strerror or exc}") from None
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml  # a parser, not an adapter; imported lazily to keep start-up lean

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"agent file {str(p)!r}: unknown format {suffix!r} (use .yaml, .toml or .json)"
            )
    except ConfigError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"agent file {str(p)!r} does not parse: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"agent file {str(p)!r} must hold a mapping of agent fields")
    try:
        return Agent.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"agent file {str(p)!r}: {exc}") from None
