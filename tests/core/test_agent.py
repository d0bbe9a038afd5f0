from __future__ import annotations

from pathlib import Path

import pytest

from nimbus.core.agent import Agent, Limits, load_agent
from nimbus.exceptions import ConfigError

YAML = """
name: mathbot
instructions: Use the calculator.
model: openai:gpt-4o-mini
tools: [calculator]
limits:
  max_steps: 4
  timeout_s: 30
"""
TOML = """
name = "mathbot"
instructions = "Use the calculator."
model = "openai:gpt-4o-mini"
tools = ["calculator"]
[limits]
max_steps = 4
timeout_s = 30
"""
JSON = """{"name": "mathbot", "instructions": "Use the calculator.", "model": "openai:gpt-4o-mini",
 "tools": ["calculator"], "limits": {"max_steps": 4, "timeout_s": 30}}"""


@pytest.mark.parametrize(("suffix", "text"), [(".yaml", YAML), (".toml", TOML), (".json", JSON)])
def test_load_agent_formats_agree(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"agent{suffix}"
    path.write_text(text)
    agent = load_agent(path)
    assert agent.name == "mathbot"
    assert agent.tools == ["calculator"]
    assert agent.limits.max_steps == 4
    assert agent.limits.timeout_s == 30
    assert agent.limits.tool_timeout_s == Limits().tool_timeout_s


def test_defaults_are_safe() -> None:
    agent = Agent()
    assert agent.model == "local:smollm2"
    assert agent.limits.max_steps == 10
    assert agent.limits.max_total_tokens is not None
    assert agent.limits.timeout_s > 0


def test_json_round_trip() -> None:
    agent = Agent(name="a", tools=["calculator"], limits=Limits(max_steps=3))
    assert Agent.from_dict(agent.to_dict()) == agent
    assert Agent.from_json('{"name": "b"}').name == "b"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "colour": "red"}, "colour"),
        ({"limits": {"max_steps": 0}}, "max_steps"),
        ({"limits": {"max_steps": "many"}}, "limits.max_steps"),
        ({"tools": "calculator"}, "tools"),
    ],
)
def test_invalid_specs_say_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Agent.from_dict(data)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="does not parse"):
        load_agent(bad)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_agent(scalar)
    other = tmp_path / "agent.ini"
    other.write_text("x")
    with pytest.raises(ConfigError, match="unknown format"):
        load_agent(other)
    with pytest.raises(ConfigError, match="invalid agent JSON"):
        Agent.from_json("{nope")
