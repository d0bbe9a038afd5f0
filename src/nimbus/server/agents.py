"""Assistants are Nimbus agents: ``graph_id`` names the agent kind and the settings come from
``config.configurable`` and ``context``. Models and their endpoints are the operator's: a
tenant names a model id, never a URL or a key."""

from __future__ import annotations

from typing import Any

from nimbus.core.agent import DEFAULT_INSTRUCTIONS, Agent, Limits
from nimbus.core.model import Model
from nimbus.core.tool import Tool, ToolRegistry
from nimbus.exceptions import ConfigError
from nimbus.models import resolve_model
from nimbus.settings import Settings

GRAPHS = {"agent": "The Nimbus tool-calling agent: a model, tools and a step loop."}
SETTINGS_KEYS = {
    "model",
    "instructions",
    "system_prompt",
    "tools",
    "max_steps",
    "temperature",
    "max_tokens",
    "timeout_s",
}

CONFIG_SCHEMA: dict[str, Any] = {
    "title": "Configurable",
    "type": "object",
    "properties": {
        "model": {
            "type": "string",
            "description": "Model id, e.g. local:smollm2 or openai:gpt-4o-mini",
        },
        "instructions": {"type": "string", "description": "System prompt"},
        "tools": {"type": "array", "items": {"type": "string"}, "description": "Tool names"},
        "max_steps": {"type": "integer", "minimum": 1, "maximum": 100},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "max_tokens": {"type": "integer", "minimum": 1},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    },
}
STATE_SCHEMA: dict[str, Any] = {
    "title": "State",
    "type": "object",
    "properties": {"messages": {"type": "array", "items": {"type": "object"}}},
}


def agent_settings(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Merge the agent settings of config.configurable / context layers, later ones winning."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        configurable = layer.get("configurable") if "configurable" in layer else layer
        if isinstance(configurable, dict):
            merged.update({k: v for k, v in configurable.items() if k in SETTINGS_KEYS})
    return merged


def build_agent(name: str, values: dict[str, Any], settings: Settings) -> Agent:
    """An Agent from merged settings; bad values raise ConfigError with the field named."""
    limits = Limits()
    data: dict[str, Any] = {
        "name": name or "assistant",
        "instructions": values.get("instructions")
        or values.get("system_prompt")
        or DEFAULT_INSTRUCTIONS,
        "model": values.get("model") or settings.default_model,
        "tools": values.get("tools") or [],
        "limits": {
            "max_steps": values.get("max_steps", limits.max_steps),
            "max_tokens": values.get("max_tokens", limits.max_tokens),
            "timeout_s": values.get("timeout_s", limits.timeout_s),
        },
        "temperature": values.get("temperature"),
    }
    return Agent.from_dict(data)


class AgentFactory:
    """Resolves agents' models (cached: one connection pool per model) and tools."""

    def __init__(self, settings: Settings, tools: ToolRegistry) -> None:
        self.settings = settings
        self.tools = tools
        self._models: dict[str, Model] = {}

    def validate(
        self, graph_id: str, config: dict[str, Any] | None, context: dict[str, Any] | None
    ) -> None:
        """Check an assistant's settings now, so a bad one is a 4xx and not a failed run."""
        if graph_id not in GRAPHS:
            raise ConfigError(f"unknown graph_id {graph_id!r}; available: {', '.join(GRAPHS)}")
        agent = build_agent("check", agent_settings(config, context), self.settings)
        self.tools.resolve(agent.tools)
        provider = agent.model.partition(":")[0]
        if provider not in ("local", "openai", "test") or ":" not in agent.model:
            raise ConfigError(
                f"unknown model {agent.model!r}; use e.g. local:smollm2 or openai:<model>"
            )
        if provider == "local" and agent.model != "local:smollm2":
            raise ConfigError(
                "only local:smollm2 may be named by a tenant; ask the operator for others"
            )

    def model(self, model_id: str) -> Model:
        """The shared model instance for ``model_id``."""
        model = self._models.get(model_id)
        if model is None:
            model = resolve_model(model_id, self.settings)
            self._models[model_id] = model
        return model

    def tools_for(self, agent: Agent) -> list[Tool]:
        """The agent's tools."""
        return self.tools.resolve(agent.tools)

    async def aclose(self) -> None:
        """Close every model's connections."""
        for model in self._models.values():
            await model.aclose()
        self._models.clear()
