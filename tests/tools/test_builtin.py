"""The built-in tools through the Tool interface (validate, then call), as the runtime uses them."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest

from nimbus.adapters.tools.builtin import builtin_tools
from nimbus.core.tool import Tool, ToolRegistry
from nimbus.exceptions import ConfigError, ToolError
from nimbus.settings import Settings


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail any name resolution: the refusals below must happen before any lookup."""
    lookups: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        lookups.append(args)
        raise AssertionError(f"unexpected DNS lookup: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return lookups


def one(name: str, settings: Settings | None = None) -> Tool:
    [tool] = builtin_tools(settings).resolve([name])
    return tool


# --- the registry -------------------------------------------------------------------------


def test_registry_has_the_three_builtins() -> None:
    registry = builtin_tools()
    assert isinstance(registry, ToolRegistry)
    assert registry.names() == ["calculator", "current_time", "http_fetch"]
    assert len(registry) == 3
    for name in ("calculator", "current_time", "http_fetch"):
        assert name in registry
    assert all(isinstance(t, Tool) for t in registry)
    assert [t.name for t in registry.resolve(["http_fetch", "calculator"])] == [
        "http_fetch",
        "calculator",
    ]


def test_unknown_builtin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown tool 'shell'"):
        builtin_tools().resolve(["shell"])


def test_specs_describe_the_arguments() -> None:
    registry = builtin_tools()
    calc, clock, fetch = (registry.resolve([n])[0].spec for n in registry.names())
    assert calc.parameters["required"] == ["expression"]
    assert calc.parameters["properties"]["expression"]["type"] == "string"
    assert calc.parameters["properties"]["expression"]["description"]
    assert "required" not in clock.parameters  # timezone has a default
    assert clock.parameters["properties"]["timezone"]["default"] == "UTC"
    assert fetch.parameters["required"] == ["url"]
    assert all(spec.description for spec in (calc, clock, fetch))


# --- calculator ---------------------------------------------------------------------------


async def test_calculator_validates_and_returns_42() -> None:
    calc = one("calculator")
    kwargs = calc.validate('{"expression": "6*7"}')
    assert kwargs == {"expression": "6*7"}
    result = await calc.call(kwargs)
    assert result == 42
    assert isinstance(result, int)
    assert await calc.call(calc.validate('{"expression": "6 * 7"}')) == 42


@pytest.mark.parametrize(
    ("expression", "match"),
    [
        ("1 / 0", "division by zero"),
        ("2 ^ 3", r"use \*\* for powers"),
        ("x + 1", "unknown name 'x'"),
        ("__import__('os')", "unknown function"),
        ("", "empty expression"),
    ],
)
async def test_calculator_errors_surface_as_tool_errors(expression: str, match: str) -> None:
    calc = one("calculator")
    kwargs = calc.validate(pydantic.TypeAdapter(dict).dump_json({"expression": expression}))
    with pytest.raises(ToolError, match=match) as info:
        await calc.call(kwargs)
    assert type(info.value) is ToolError  # re-raised as a plain ToolError for the model


def test_calculator_rejects_bad_arguments_at_validation() -> None:
    calc = one("calculator")
    with pytest.raises(pydantic.ValidationError):
        calc.validate("{}")
    with pytest.raises(pydantic.ValidationError):
        calc.validate('{"expression": "1", "extra": 2}')
    with pytest.raises(pydantic.ValidationError):
        calc.validate("not json")


# --- current_time -------------------------------------------------------------------------


async def test_current_time_utc_by_default() -> None:
    clock = one("current_time")
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = await clock.call(clock.validate("{}"))
    after = datetime.now(UTC)
    assert isinstance(stamp, str)
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0)
    assert before <= parsed <= after


async def test_current_time_explicit_utc_and_zones() -> None:
    clock = one("current_time")
    for name in ("UTC", "utc"):
        parsed = datetime.fromisoformat(
            await clock.call(clock.validate(f'{{"timezone": "{name}"}}'))
        )
        assert parsed.utcoffset() == timedelta(0)
    tokyo = datetime.fromisoformat(await clock.call(clock.validate('{"timezone": "Asia/Tokyo"}')))
    assert tokyo.utcoffset() == timedelta(hours=9)  # no DST in Japan
    kolkata = datetime.fromisoformat(await clock.call({"timezone": "Asia/Kolkata"}))
    assert kolkata.utcoffset() == timedelta(hours=5, minutes=30)


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Not A Zone", "../etc/passwd"])
async def test_current_time_unknown_zone_is_a_tool_error(zone: str) -> None:
    clock = one("current_time")
    with pytest.raises(ToolError, match="unknown time zone"):
        await clock.call(clock.validate(pydantic.TypeAdapter(dict).dump_json({"timezone": zone})))


# --- http_fetch ---------------------------------------------------------------------------


async def test_http_fetch_refuses_loopback_before_connecting(no_dns: list[Any]) -> None:
    fetch = one("http_fetch")
    with pytest.raises(ToolError, match="refused") as info:
        await fetch.call(fetch.validate('{"url": "http://127.0.0.1:1/"}'))
    assert "loopback" in str(info.value)
    assert no_dns == []


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@example.com/",  # credentials
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/",
        "http://2130706433/",  # 127.0.0.1 as a number
        "http://[::1]/",
    ],
)
async def test_http_fetch_refuses_without_network(url: str, no_dns: list[Any]) -> None:
    fetch = one("http_fetch")
    with pytest.raises(ToolError, match="refused"):
        await fetch.call({"url": url})
    assert no_dns == []


async def test_http_fetch_allow_list_refuses_before_resolving(no_dns: list[Any]) -> None:
    fetch = one("http_fetch", Settings(http_fetch_allowed_hosts=["example.com"]))
    with pytest.raises(ToolError, match="refused") as info:
        await fetch.call(fetch.validate('{"url": "http://other.org/"}'))
    assert "not in the allowed hosts list" in str(info.value)
    assert "other.org" in str(info.value)
    for url in ("http://example.com.evil.org/", "http://notexample.com/"):
        with pytest.raises(ToolError, match="not in the allowed hosts list"):
            await fetch.call({"url": url})
    assert no_dns == []


async def test_http_fetch_allow_list_from_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, no_dns: list[Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NIMBUS_HTTP_FETCH_ALLOWED_HOSTS", '["example.com"]')
    fetch = one("http_fetch", Settings())
    with pytest.raises(ToolError, match="not in the allowed hosts list"):
        await fetch.call({"url": "https://other.org/page"})
    assert no_dns == []


def test_http_fetch_has_a_timeout_and_is_idempotent() -> None:
    fetch = one("http_fetch")
    assert fetch.is_async
    assert fetch.idempotent
    assert fetch.timeout_s is not None and fetch.timeout_s > 0


def test_tool_modules_add_their_tools() -> None:
    registry = builtin_tools(Settings(tool_modules=["nimbus.testing.tools"]))
    step, payment = registry.resolve(["slow_step", "slow_payment"])
    assert step.idempotent and not payment.idempotent
    assert "calculator" in registry  # the built-in ones stay


@pytest.mark.parametrize(
    ("module", "message"), [("no.such.module", "cannot import"), ("json", "no TOOLS list")]
)
def test_a_bad_tool_module_is_a_clear_config_error(module: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        builtin_tools(Settings(tool_modules=[module]))
