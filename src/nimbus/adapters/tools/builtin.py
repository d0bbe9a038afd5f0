"""The built-in tools: ``calculator``, ``current_time`` and ``http_fetch``."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nimbus.adapters.tools.calculator import CalculatorError, calculate
from nimbus.adapters.tools.http_fetch import FetchError, FetchPolicy, fetch_url
from nimbus.core.tool import Tool, ToolRegistry
from nimbus.exceptions import ConfigError, ToolError
from nimbus.settings import Settings


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly, e.g. "(17 + 25) * 3" or "sqrt(2) ** 2".

    Args:
        expression: Numbers, + - * / // % ** and parentheses; functions sqrt, abs, round,
            min, max, floor, ceil, log, log10, exp, sin, cos, tan; constants pi and e.
    """
    try:
        return calculate(expression)
    except CalculatorError as exc:
        raise ToolError(str(exc)) from None


def current_time(timezone: str = "UTC") -> str:
    """The current date and time in ISO 8601 format.

    Args:
        timezone: An IANA time zone name such as "Europe/Paris"; UTC by default.
    """
    try:
        zone = ZoneInfo(timezone) if timezone.upper() != "UTC" else UTC
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(
            f"unknown time zone {timezone!r}; use an IANA name like 'Europe/Paris'"
        ) from None
    return datetime.now(zone).isoformat(timespec="seconds")


def make_http_fetch(policy: FetchPolicy) -> Tool:
    """The ``http_fetch`` tool bound to a fetch policy (size, time and host limits)."""

    async def http_fetch(url: str) -> dict[str, object]:
        """Fetch a public web page or API with HTTP GET and return its text.

        Args:
            url: An http:// or https:// URL on the public internet.
        """
        try:
            result = await fetch_url(url, policy=policy)
        except FetchError as exc:
            raise ToolError(str(exc)) from None
        return {
            "url": result.url,
            "status": result.status,
            "content_type": result.content_type,
            "truncated": result.truncated,
            "text": result.text,
        }

    # The fetch enforces its own time cap; the tool timeout is a little longer.
    return Tool.from_function(http_fetch, timeout_s=policy.timeout_s + 5, idempotent=True)


def builtin_tools(settings: Settings | None = None) -> ToolRegistry:
    """A registry holding every built-in tool, configured from ``settings``, and the tools of
    the modules ``settings.tool_modules`` names (each module's ``TOOLS``: tools or typed
    functions)."""
    settings = settings or Settings()
    allowed = settings.http_fetch_allowed_hosts
    policy = FetchPolicy(allowed_hosts=frozenset(allowed) if allowed else None)
    registry = ToolRegistry(
        [
            Tool.from_function(calculator, run_in_thread=False),
            Tool.from_function(current_time, run_in_thread=False),
            make_http_fetch(policy),
        ]
    )
    for name in settings.tool_modules or ():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"NIMBUS_TOOL_MODULES: cannot import {name!r}: {exc}") from None
        tools = getattr(module, "TOOLS", None)
        if tools is None:
            raise ConfigError(f"NIMBUS_TOOL_MODULES: module {name!r} has no TOOLS list")
        for tool in tools:
            registry.register(tool)
    return registry
