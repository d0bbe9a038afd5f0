"""The CLI against a running server: ``nimbus run --url``, ``nimbus assistants create|list``."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from nimbus.core.agent import Agent, load_agent
from nimbus.exceptions import NimbusError, RunFailed, UserError


def assistant_body(agent: Agent) -> dict[str, Any]:
    """The ``POST /assistants`` body for an agent spec (its id derives from its name)."""
    return {
        "assistant_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"nimbus-agent/{agent.name}")),
        "graph_id": "agent",
        "name": agent.name,
        "description": agent.description or None,
        "config": {
            "configurable": {
                "model": agent.model,
                "instructions": agent.instructions,
                "tools": agent.tools,
                "max_steps": agent.limits.max_steps,
                "max_tokens": agent.limits.max_tokens,
                "timeout_s": agent.limits.timeout_s,
                **({"temperature": agent.temperature} if agent.temperature is not None else {}),
            }
        },
    }


class Remote:
    """A small client of the Nimbus API with one-line errors."""

    def __init__(self, url: str, api_key: str | None) -> None:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--url must be an http(s) URL, got {url!r}")
        if not api_key:
            raise UserError("an API key is needed: --api-key or NIMBUS_API_KEY")
        self.url = url.rstrip("/")
        self.headers = {"x-api-key": api_key, "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10))

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; 4xx/5xx become a one-line :class:`NimbusError`."""
        try:
            async with self.session.request(
                method,
                self.url + path,
                headers=self.headers,
                data=None if body is None else orjson.dumps(body),
            ) as r:
                data = await r.read()
                if r.status >= 400:
                    raise NimbusError(f"{method} {path} answered {r.status}: {_detail(data)}")
                return orjson.loads(data) if data else None
        except aiohttp.ClientError as exc:
            raise NimbusError(f"cannot reach {self.url}: {exc}") from None

    async def stream(self, path: str, body: Any) -> Any:
        """Yield ``(event, data)`` of an SSE response."""
        try:
            async with self.session.post(
                self.url + path, headers=self.headers, data=orjson.dumps(body)
            ) as r:
                if r.status >= 400:
                    raise NimbusError(f"POST {path} answered {r.status}: {_detail(await r.read())}")
                event = ""
                async for raw in r.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        yield event, json.loads(line[5:])
        except aiohttp.ClientError as exc:
            raise NimbusError(f"cannot reach {self.url}: {exc}") from None


def _detail(data: bytes) -> str:
    try:
        body = orjson.loads(data)
        if isinstance(body, dict):
            found = body.get("detail") or body.get("message") or body.get("error")
            if found:
                return str(found if not isinstance(found, dict) else found.get("message", found))
    except orjson.JSONDecodeError:
        pass
    return data[:200].decode(errors="replace") or "(no body)"


async def create_assistant(url: str, api_key: str | None, agent_file: Path) -> str:
    """Create (or update) the assistant an agent file describes; returns its JSON."""
    agent = load_agent(agent_file)
    body = assistant_body(agent)
    async with Remote(url, api_key) as remote:
        found = await remote.call("POST", "/assistants", {**body, "if_exists": "do_nothing"})
        if found.get("config") != body["config"]:
            found = await remote.call(
                "PATCH",
                f"/assistants/{body['assistant_id']}",
                {k: body[k] for k in ("config", "name")},
            )
    return json.dumps(found, indent=2)


async def list_assistants(url: str, api_key: str | None) -> list[str]:
    """One line per assistant: id, name, model."""
    async with Remote(url, api_key) as remote:
        rows = await remote.call("POST", "/assistants/search", {"limit": 1000})
    return [
        f"{a['assistant_id']}  {a['name']}  "
        f"{(a.get('config') or {}).get('configurable', {}).get('model', '(server default)')}"
        for a in rows
    ]


async def run_remote(
    url: str,
    api_key: str | None,
    prompt: str,
    *,
    assistant: str | None,
    agent_file: Path | None,
    json_output: bool,
) -> int:
    """Run one turn on the server (stateless run), streaming the answer."""
    async with Remote(url, api_key) as remote:
        if agent_file is not None:
            body = assistant_body(load_agent(agent_file))
            await remote.call("POST", "/assistants", {**body, "if_exists": "do_nothing"})
            assistant = body["assistant_id"]
        run_body = {
            "assistant_id": assistant or "agent",
            "input": {"messages": [{"role": "user", "content": prompt}]},
            "stream_mode": ["values"] if json_output else ["messages-tuple", "updates"],
            "on_completion": "delete",
        }
        final: Any = None
        async for event, data in remote.stream("/runs/stream", run_body):
            if event == "error":
                raise RunFailed(
                    data.get("message", "run failed"), reason=data.get("error", "error")
                )
            if event == "values":
                final = data
            elif event == "messages" and data[0].get("type") == "AIMessageChunk":
                sys.stdout.write(data[0].get("content") or "")
                sys.stdout.flush()
            elif event == "updates" and "agent" in data:
                for call in data["agent"]["messages"][0].get("tool_calls") or ():
                    print(f"→ {call['name']}({json.dumps(call['args'])})", file=sys.stderr)
            elif event == "updates" and "tools" in data:
                for message in data["tools"]["messages"]:
                    print(f"← {str(message['content'])[:200]}", file=sys.stderr)
        if json_output:
            print(json.dumps(final, indent=2))
        else:
            print()
    return 0
