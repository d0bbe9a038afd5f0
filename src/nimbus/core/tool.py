"""Tools: typed Python functions the model can call.

A tool's JSON schema comes from the function's signature and docstring; its arguments are
validated against that schema (with pydantic) before the function ever runs.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, get_type_hints, overload

import pydantic
import pydantic_core

from nimbus.core.model import ToolSpec
from nimbus.exceptions import ConfigError, ToolDefinitionError

_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SECTION = re.compile(r"^\s*(Returns|Raises|Yields|Examples?|Notes?)\s*:\s*$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its description and per-argument descriptions."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    args: dict[str, str] = {}
    current: str | None = None
    in_args = in_other = False
    for line in lines:
        if _ARGS_HEADER.match(line):
            in_args, in_other, current = True, False, None
            continue
        if _SECTION.match(line):
            in_args, in_other, current = False, True, None
            continue
        if in_other:
            continue
        if in_args:
            m = _ARG_LINE.match(line)
            if m and (len(line) - len(line.lstrip())) <= 4:
                current = m.group(1).lstrip("*")
                args[current] = m.group(2).strip()
            elif current and line.strip():
                args[current] = f"{args[current]} {line.strip()}".strip()
            continue
        summary.append(line)
    return "\n".join(summary).strip(), args


@dataclass(slots=True)
class Tool:
    """A callable the model may use, with its schema and execution policy.

    ``idempotent`` says whether running it twice (after a crash) is harmless;
    ``run_in_thread`` moves a blocking sync function off the event loop.
    """

    name: str
    description: str
    function: Callable[..., Any]
    parameters: dict[str, Any]
    arguments_model: type[pydantic.BaseModel]
    is_async: bool
    run_in_thread: bool = True
    timeout_s: float | None = None
    idempotent: bool = True
    _field_names: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_function(
        cls,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
        run_in_thread: bool | None = None,
        idempotent: bool = True,
    ) -> Tool:
        """Build a tool from a typed function; its docstring documents the arguments."""
        tool_name = name or str(getattr(function, "__name__", ""))
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool_name):
            raise ToolDefinitionError(
                f"tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-'"
            )
        summary, arg_docs = parse_docstring(inspect.getdoc(function))
        try:
            hints = get_type_hints(function)
        except Exception as exc:
            raise ToolDefinitionError(f"tool {tool_name!r}: cannot read type hints: {exc}") from exc
        fields: dict[str, Any] = {}
        for param in inspect.signature(function).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ToolDefinitionError(f"tool {tool_name!r}: *args/**kwargs are not supported")
            if param.name not in hints:
                raise ToolDefinitionError(
                    f"tool {tool_name!r}: parameter {param.name!r} needs a type annotation"
                )
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (
                hints[param.name],
                pydantic.Field(default, description=arg_docs.get(param.name)),
            )
        model = pydantic.create_model(
            f"{tool_name}_arguments",
            __config__=pydantic.ConfigDict(extra="forbid"),
            **fields,
        )
        schema = model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        is_async = inspect.iscoroutinefunction(function)
        return cls(
            name=tool_name,
            description=str(description or summary or tool_name),
            function=function,
            parameters=schema,
            arguments_model=model,
            is_async=is_async,
            run_in_thread=(not is_async) if run_in_thread is None else run_in_thread,
            timeout_s=timeout_s,
            idempotent=idempotent,
            _field_names=tuple(fields),
        )

    @property
    def spec(self) -> ToolSpec:
        """The part of the tool the model sees."""
        return ToolSpec(self.name, self.description, self.parameters)

    def validate(self, arguments: str) -> dict[str, Any]:
        """Parse and validate raw JSON arguments; raises ``pydantic.ValidationError``."""
        parsed = self.arguments_model.model_validate_json(arguments or "{}")
        return {name: getattr(parsed, name) for name in self._field_names}

    async def call(self, kwargs: dict[str, Any]) -> Any:
        """Run the function with validated arguments (sync ones in a thread if asked)."""
        if self.is_async:
            return await self.function(**kwargs)
        if self.run_in_thread:
            return await asyncio.to_thread(self.function, **kwargs)
        return self.function(**kwargs)


@overload
def tool(function: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    timeout_s: float | None = None,
    run_in_thread: bool | None = None,
    idempotent: bool = True,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    timeout_s: float | None = None,
    run_in_thread: bool | None = None,
    idempotent: bool = True,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Decorator: turn a typed function into a :class:`Tool`."""

    def wrap(fn: Callable[..., Any]) -> Tool:
        return Tool.from_function(
            fn, name=name, timeout_s=timeout_s, run_in_thread=run_in_thread, idempotent=idempotent
        )

    return wrap if function is None else wrap(function)


def format_tool_output(value: Any) -> str:
    """Render a tool's return value as the text the model reads."""
    if isinstance(value, str):
        return value
    return pydantic_core.to_json(value).decode()


class ToolRegistry:
    """Tools by name; resolves the tool names an agent spec lists."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, item: Tool | Callable[..., Any] | Callable[..., Awaitable[Any]]) -> Tool:
        """Add a tool (or a function, turned into one); names must be unique."""
        t = item if isinstance(item, Tool) else Tool.from_function(item)
        if t.name in self._tools:
            raise ToolDefinitionError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def resolve(self, names: Iterable[str]) -> list[Tool]:
        """The tools with these names; an unknown name is a :class:`ConfigError`."""
        found = []
        for n in names:
            if n not in self._tools:
                raise ConfigError(f"unknown tool {n!r}; known tools: {', '.join(self.names())}")
            found.append(self._tools[n])
        return found

    def names(self) -> list[str]:
        """Registered tool names, sorted."""
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)
