"""LangGraph shapes: messages as LangGraph clients expect them, and back.

Thread values hold ``{"messages": [...]}`` with LangChain-style message dicts
(``type`` human / ai / tool / system, ``content``, ``tool_calls``, ``id``).
"""

from __future__ import annotations

import json
from typing import Any

from nimbus.core.messages import (
    AssistantMessage,
    Message,
    SystemMessage,
    ToolCall,
    ToolResultMessage,
    UserMessage,
)
from nimbus.exceptions import UserError
from nimbus.records import load_json

ROLE_TO_TYPE = {
    "user": "human",
    "human": "human",
    "assistant": "ai",
    "ai": "ai",
    "tool": "tool",
    "system": "system",
    "developer": "system",
}


def text_of(content: Any) -> str:
    """Text of a message content: a string, or a list of content blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") in (
                "text",
                "input_text",
                "output_text",
            ):
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    raise UserError("message content must be a string or a list of content blocks")


def to_lg(message: Message, message_id: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A Nimbus message as a LangGraph message dict."""
    if isinstance(message, UserMessage):
        return {
            "type": "human",
            "content": message.content,
            "id": message_id,
            "additional_kwargs": {},
            "response_metadata": {},
            "name": None,
            "example": False,
        }
    if isinstance(message, AssistantMessage):
        out: dict[str, Any] = {
            "type": "ai",
            "content": message.content,
            "id": message_id,
            "tool_calls": [
                {"name": c.name, "args": _args(c.arguments), "id": c.id, "type": "tool_call"}
                for c in message.tool_calls
            ],
            "invalid_tool_calls": [],
            "additional_kwargs": {},
            "response_metadata": {},
            "name": None,
            "example": False,
        }
        if usage:
            out["usage_metadata"] = usage
        return out
    if isinstance(message, ToolResultMessage):
        return {
            "type": "tool",
            "content": message.content,
            "id": message_id,
            "tool_call_id": message.tool_call_id,
            "name": message.name,
            "status": "error" if message.is_error else "success",
            "additional_kwargs": {},
            "response_metadata": {},
        }
    return {
        "type": "system",
        "content": message.content,
        "id": message_id,
        "additional_kwargs": {},
        "response_metadata": {},
    }


def _args(arguments: str) -> Any:
    try:
        return load_json(arguments)
    except ValueError:
        return {"__raw__": arguments}


def from_lg(data: Any) -> Message:
    """A message dict from a client (LangGraph ``type`` or OpenAI ``role`` style)."""
    if isinstance(data, str):
        return UserMessage(data)
    if not isinstance(data, dict):
        raise UserError("each message must be an object with 'role' (or 'type') and 'content'")
    kind = ROLE_TO_TYPE.get(str(data.get("type") or data.get("role") or ""))
    if kind is None:
        raise UserError(
            f"unknown message role {str(data.get('role') or data.get('type'))[:50]!r}; "
            "use user, assistant, tool or system"
        )
    content = text_of(data.get("content"))
    if kind == "human":
        return UserMessage(content)
    if kind == "system":
        return SystemMessage(content)
    if kind == "tool":
        call_id = data.get("tool_call_id")
        if not isinstance(call_id, str):
            raise UserError("a tool message needs 'tool_call_id'")
        return ToolResultMessage(
            call_id, str(data.get("name") or ""), content, data.get("status") == "error"
        )
    raw_calls = data.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise UserError("tool_calls must be a list of objects")
    return AssistantMessage(content, [_tool_call(c) for c in raw_calls])


def _tool_call(c: Any) -> ToolCall:
    """A tool call in LangGraph (``name``/``args``) or OpenAI (``function``) shape."""
    if not isinstance(c, dict):
        raise UserError("tool_calls must be objects")
    if "function" in c:  # OpenAI shape
        fn = c.get("function") or {}
        if not isinstance(fn, dict):
            raise UserError("tool_calls[].function must be an object with name and arguments")
        arguments = fn.get("arguments") or "{}"
        return ToolCall(
            str(c.get("id", "")),
            str(fn.get("name", "")),
            arguments if isinstance(arguments, str) else json.dumps(arguments),
        )
    args = c.get("args", {})
    return ToolCall(
        str(c.get("id", "")),
        str(c.get("name", "")),
        args if isinstance(args, str) else json.dumps(args),
    )


def input_messages(run_input: Any) -> list[Message]:
    """The messages of a run's ``input`` (``{"messages": [...]}``, or ``None`` for none)."""
    if run_input is None:
        return []
    if not isinstance(run_input, dict):
        raise UserError('input must be an object such as {"messages": [...]}')
    messages = run_input.get("messages", [])
    if isinstance(messages, dict | str):
        messages = [messages]
    if not isinstance(messages, list):
        raise UserError("input.messages must be a list of messages")
    return [from_lg(m) for m in messages]


def check_input(messages: list[Message]) -> None:
    """Refuse (UserError) an input whose assistant messages ask for tool calls that the input
    does not answer: a run executes only the tool calls its own model asks for, and input is
    history. (Run as given, one such message with 1,600 calls ran 1,600 tools.)"""
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolResultMessage)}
    for n, message in enumerate(messages):
        if isinstance(message, AssistantMessage) and message.tool_calls:
            owed = [c for c in message.tool_calls if c.id not in answered]
            if owed:
                names = ", ".join(sorted({c.name for c in owed}))[:200]
                raise UserError(
                    f"input.messages[{n}] asks for {len(owed)} tool call(s) ({names}) that "
                    "have no tool result in the input: a run executes only the tool calls its "
                    "own model makes; send each call's result (a tool message with its "
                    "tool_call_id) after it, or leave the calls out"
                )


def thread_messages(values: dict[str, Any] | None) -> list[tuple[str, Message]]:
    """(id, message) pairs of a thread's stored values."""
    out = []
    for i, data in enumerate((values or {}).get("messages", [])):
        out.append((str(data.get("id") or f"m{i}"), from_lg(data)))
    return out
