from __future__ import annotations

from typing import Literal

import pydantic
import pytest

from nimbus.core.tool import Tool, ToolRegistry, format_tool_output, parse_docstring, tool
from nimbus.exceptions import ConfigError, ToolDefinitionError


def forecast(city: str, days: int = 1, unit: Literal["C", "F"] = "C") -> str:
    """Weather forecast for a city.

    Args:
        city: The city's name.
        days: How many days ahead,
            between 1 and 7.
        unit: Temperature unit.

    Returns:
        A short forecast.
    """
    return f"{city}:{days}:{unit}"


def test_schema_from_signature_and_docstring() -> None:
    t = Tool.from_function(forecast)
    assert t.name == "forecast"
    assert t.description == "Weather forecast for a city."
    props = t.parameters["properties"]
    assert props["city"] == {"type": "string", "description": "The city's name."}
    assert props["days"]["type"] == "integer"
    assert props["days"]["default"] == 1
    assert props["days"]["description"] == "How many days ahead, between 1 and 7."
    assert props["unit"]["enum"] == ["C", "F"]
    assert t.parameters["required"] == ["city"]
    assert t.parameters["additionalProperties"] is False
    assert t.spec.name == "forecast"


def test_validate_arguments() -> None:
    t = Tool.from_function(forecast)
    assert t.validate('{"city": "Paris"}') == {"city": "Paris", "days": 1, "unit": "C"}
    for bad in [
        '{"city": 3}',
        '{"days": 2}',
        '{"city": "x", "unit": "K"}',
        '{"city": "x", "extra": 1}',
        '{"city": ',
        "[]",
    ]:
        with pytest.raises(pydantic.ValidationError):
            t.validate(bad)


async def test_sync_and_async_calls() -> None:
    async def double(x: int) -> int:
        """Double x."""
        return 2 * x

    a = Tool.from_function(double)
    s = Tool.from_function(forecast)
    assert a.is_async and not a.run_in_thread
    assert not s.is_async and s.run_in_thread
    assert await a.call({"x": 21}) == 42
    assert await s.call({"city": "Oslo", "days": 2, "unit": "F"}) == "Oslo:2:F"


def test_decorator_and_options() -> None:
    @tool(name="lookup", timeout_s=2.5, idempotent=False)
    def find(key: str) -> str:
        """Find a key."""
        return key

    assert isinstance(find, Tool)
    assert (find.name, find.timeout_s, find.idempotent) == ("lookup", 2.5, False)


def test_bad_definitions() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def star(*args: int) -> None: ...

    with pytest.raises(ToolDefinitionError, match="type annotation"):
        Tool.from_function(untyped)
    with pytest.raises(ToolDefinitionError, match=r"\*args"):
        Tool.from_function(star)
    with pytest.raises(ToolDefinitionError, match="tool name"):
        Tool.from_function(forecast, name="has space")


def test_registry() -> None:
    reg = ToolRegistry([Tool.from_function(forecast)])
    assert reg.names() == ["forecast"]
    assert [t.name for t in reg.resolve(["forecast"])] == ["forecast"]
    with pytest.raises(ConfigError, match="unknown tool 'nope'"):
        reg.resolve(["nope"])
    with pytest.raises(ToolDefinitionError, match="already registered"):
        reg.register(forecast)


def test_output_formatting() -> None:
    assert format_tool_output("plain") == "plain"
    assert format_tool_output({"a": [1, 2]}) == '{"a":[1,2]}'
    assert format_tool_output(3.5) == "3.5"


def test_parse_docstring_without_args() -> None:
    assert parse_docstring("Just a line.") == ("Just a line.", {})
    assert parse_docstring(None) == ("", {})
