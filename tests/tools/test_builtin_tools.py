"""The built-in tools as the model sees and calls them."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from nimbus.adapters.tools.builtin import builtin_tools
from nimbus.exceptions import ToolError
from nimbus.settings import Settings


def test_registry_holds_the_builtins() -> None:
    assert builtin_tools().names() == ["calculator", "current_time", "http_fetch"]


async def test_calculator_tool() -> None:
    [calc] = builtin_tools().resolve(["calculator"])
    assert calc.parameters["required"] == ["expression"]
    assert await calc.call(calc.validate('{"expression": "6 * 7"}')) == 42
    with pytest.raises(ToolError, match="division by zero"):
        await calc.call(calc.validate('{"expression": "1 / 0"}'))


async def test_current_time_tool() -> None:
    [clock] = builtin_tools().resolve(["current_time"])
    utc = datetime.fromisoformat(await clock.call(clock.validate("{}")))
    assert utc.utcoffset() == timedelta(0)
    tokyo = datetime.fromisoformat(await clock.call({"timezone": "Asia/Tokyo"}))
    assert tokyo.utcoffset() == timedelta(hours=9)
    with pytest.raises(ToolError, match="unknown time zone"):
        await clock.call({"timezone": "Mars/Olympus"})


async def test_http_fetch_tool_refuses_loopback_and_unlisted_hosts() -> None:
    [fetch] = builtin_tools().resolve(["http_fetch"])
    with pytest.raises(ToolError, match="refused"):
        await fetch.call({"url": "http://127.0.0.1:1/"})
    [listed] = builtin_tools(Settings(http_fetch_allowed_hosts=["example.com"])).resolve(
        ["http_fetch"]
    )
    with pytest.raises(ToolError, match="refused"):
        await listed.call({"url": "http://other.org/"})
