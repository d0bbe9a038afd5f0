"""Assistants are Nimbus agents: ``graph_id`` names the agent kind and the settings come from
``config.configurable`` and ``context``. Models and their endpoints are the operator's: a
tenant names a model id, never a URL or a key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nimbus.core.agent import DEFAULT_INSTRUCTIONS, Agent, Limits
from nimbus.core.model import MAX_MODEL_ID, Model
from nimbus.core.tool import Tool, ToolRegistry
from nimbus.exceptions import ConfigError, NotAllowed
from nimbus.ports import ModelCatalog

GRAPHS = {"agent": "The Nimbus tool-calling agent: a model, tools and a step loop."}
MAX_TOKENS = 131_072  #: the most output tokens an assistant may ask of one model response


class AgentSettings(BaseModel):
    """An assistant's settings (``config.configurable`` and ``context``, merged with a run's
    own), with the bounds every run is held to. Checked when an assistant or a run names
    them (a 422 that names the field) and again when a run starts; the JSON schema that
    ``/assistants/{id}/schemas`` serves is made from this class, so what is documented is
    what is enforced. A value left out, or null, takes the default."""

    model_config = ConfigDict(extra="ignore", title="Configurable")

    model: str | None = Field(
        default=None,
        max_length=MAX_MODEL_ID,
        description="Model id, e.g. local:smollm2 or openai:gpt-4o-mini",
    )
    instructions: str | None = Field(default=None, max_length=100_000, description="System prompt")
    system_prompt: str | None = Field(
        default=None, max_length=100_000, description="System prompt (as instructions)"
    )
    tools: list[str] | None = Field(default=None, max_length=64, description="Tool names")
    allow_run_tools: bool | None = Field(
        default=None,
        description="Whether a run may name tools the assistant does not list (by default a "
        "run's `tools` may only narrow the assistant's)",
    )
    max_steps: int | None = Field(default=None, ge=1, le=100, description="Model calls per run")
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS, description="Output tokens per model response"
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=3600, description="Wall-clock limit of a run, in seconds"
    )
    max_tool_calls_per_step: int | None = Field(
        default=None, ge=1, le=256, description="Tool calls the model may ask for in one step"
    )
    max_tool_calls: int | None = Field(
        default=None, ge=1, le=1000, description="Tool calls the model may ask for in a run"
    )


SETTINGS_KEYS = frozenset(AgentSettings.model_fields)
CONFIG_SCHEMA: dict[str, Any] = AgentSettings.model_json_schema()
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


def checked_settings(values: dict[str, Any]) -> AgentSettings:
    """``values`` (merged settings) validated against their bounds; ConfigError names what
    is wrong."""
    try:
        return AgentSettings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError("invalid assistant settings: " + "; ".join(problems)) from None


def build_agent(name: str, values: dict[str, Any], default_model: str) -> Agent:
    """An Agent from merged settings; bad values raise ConfigError with the field named."""
    checked = checked_settings(values)
    limits = Limits()
    data: dict[str, Any] = {
        "name": name or "assistant",
        "instructions": checked.instructions or checked.system_prompt or DEFAULT_INSTRUCTIONS,
        "model": checked.model or default_model,
        "tools": checked.tools or [],
        "limits": {
            field: value if value is not None else getattr(limits, field)
            for field, value in (
                ("max_steps", checked.max_steps),
                ("max_tokens", checked.max_tokens),
                ("timeout_s", checked.timeout_s),
                ("max_tool_calls_per_step", checked.max_tool_calls_per_step),
                ("max_tool_calls", checked.max_tool_calls),
            )
        },
        "temperature": checked.temperature,
    }
    return Agent.from_dict(data)


class AgentFactory:
    """Resolves agents' models (cached: one connection pool per model) and tools.
    ``max_thread_bytes``: the most a thread's values may hold after a run's step."""

    def __init__(self, models: ModelCatalog, tools: ToolRegistry, *, max_thread_bytes: int) -> None:
        self.models = models
        self.tools = tools
        self.max_thread_bytes = max_thread_bytes
        self._models: dict[str, Model] = {}

    def validate(
        self,
        graph_id: str,
        config: dict[str, Any] | None,
        context: dict[str, Any] | None,
        *,
        assistant: tuple[dict[str, Any] | None, dict[str, Any] | None] | None = None,
    ) -> None:
        """Check settings now, so a bad one is a 4xx and not a failed run: those of an
        assistant, or (``assistant``: its own config and context) of a run on it, which may
        narrow the assistant's tools but not widen them unless the assistant allows it."""
        if graph_id not in GRAPHS:
            raise ConfigError(f"unknown graph_id {graph_id!r}; available: {', '.join(GRAPHS)}")
        base = agent_settings(*assistant) if assistant is not None else {}
        values = {**base, **agent_settings(config, context)}
        agent = build_agent("check", values, self.models.default)
        self.tools.resolve(agent.tools)
        provider, name = self.models.check(agent.model)
        if provider == "local" and name != "smollm2":
            raise ConfigError(
                "only local:smollm2 may be named by a tenant; ask the operator for others"
            )
        if assistant is not None and not base.get("allow_run_tools"):
            added = set(values.get("tools") or ()) - set(base.get("tools") or ())
            if added:
                raise NotAllowed(
                    f"the assistant does not list the tools {sorted(added)}: a run's tools may "
                    "only narrow the assistant's, unless the assistant sets "
                    "`allow_run_tools: true`"
                )

    def model(self, model_id: str) -> Model:
        """The shared model instance for ``model_id``."""
        model = self._models.get(model_id)
        if model is None:
            model = self.models.build(model_id)
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
