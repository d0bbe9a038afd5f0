"""The files under ``deploy/``, loaded once, and what the tests read out of them.

Shared by the tests of the Dockerfile, the Compose file and the Kubernetes manifests, which
all say the same things (commands, ports, settings) and must agree with each other and with
Nimbus itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"

# The Kubernetes release the manifests are written for (docs/deployment.md says so too).
MIN_KUBERNETES = "1.30.0"

# The ports Nimbus listens on when nothing says otherwise (docs/deployment.md).
API_PORT = 8123
WORKER_PORT = 8124


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, in the stage it belongs to."""

    stage: str
    name: str
    value: str
    line: int


@cache
def dockerfile() -> DockerfileParser:
    """The parsed deploy/Dockerfile."""
    return DockerfileParser(str(DOCKERFILE), cache_content=True)


@cache
def dockerfile_stages() -> dict[str, list[Instruction]]:
    """Instructions by stage name (``FROM ... AS name``), in order; the last stage is last."""
    stages: dict[str, list[Instruction]] = {}
    current = ""
    for item in dockerfile().structure:
        name = item["instruction"]
        if name == "COMMENT":
            continue
        if name == "FROM":
            words = item["value"].split()
            current = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else words[0]
            stages[current] = []
        if current:
            stages[current].append(Instruction(current, name, item["value"], item["startline"]))
    return stages


def final_stage() -> list[Instruction]:
    """The instructions of the stage the image is made of."""
    return list(dockerfile_stages().values())[-1]


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT, CMD or a HEALTHCHECK's CMD; ValueError otherwise."""
    value = instruction.value
    if instruction.name == "HEALTHCHECK":
        value = value.split("CMD", 1)[1]
    words = json.loads(value)
    if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
        raise ValueError(f"{instruction.name} is not in exec form: {instruction.value}")
    return words


def last(name: str) -> Instruction:
    """The final stage's last instruction called ``name`` (the one that takes effect)."""
    found = [i for i in final_stage() if i.name == name]
    assert found, f"the final stage of {DOCKERFILE.name} has no {name}"
    return found[-1]


@cache
def compose() -> dict[str, Any]:
    """deploy/compose.yaml, anchors and merge keys resolved (as Compose does)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def nimbus_services() -> dict[str, dict[str, Any]]:
    """The Compose services that run the Nimbus image."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if "build" in service or str(service.get("image", "")).startswith("nimbus")
    }


_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """``value`` as Compose would substitute it with an empty shell environment.

    ``${X:-default}`` gives the default; ``${X:?message}`` (a variable the operator must set)
    gives a stand-in, since the point here is the shape of the file, not the secret.
    """

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if operator in (":-", "-"):
            return argument
        if operator in (":?", "?"):
            return f"set-by-operator-{name.lower()}"
        return ""

    return _VARIABLE.sub(substitute, value).replace("$$", "$")


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A Compose service's environment, interpolated."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


@cache
def k8s_manifests() -> dict[str, list[dict[str, Any]]]:
    """Every resource under deploy/k8s, by file name (kustomization.yaml is not a resource)."""
    manifests = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        manifests[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return manifests


def k8s_resources(kind: str | None = None) -> list[dict[str, Any]]:
    """The resources under deploy/k8s, of one kind or of all."""
    return [
        resource
        for resources in k8s_manifests().values()
        for resource in resources
        if kind is None or resource["kind"] == kind
    ]


def kustomization() -> dict[str, Any]:
    """deploy/k8s/kustomization.yaml."""
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def k8s_env() -> dict[str, str]:
    """The environment every Nimbus pod gets: the ConfigMap's data and the Secret's."""
    env: dict[str, str] = {}
    for config_map in k8s_resources("ConfigMap"):
        env.update(config_map.get("data", {}))
    for secret in k8s_resources("Secret"):
        env.update(secret.get("stringData", {}))
    return env


def nimbus_argvs() -> dict[str, list[str]]:
    """Every ``nimbus`` command line the deployment files run, by where it is written."""
    entrypoint = exec_form(last("ENTRYPOINT"))
    assert entrypoint == ["nimbus"], entrypoint
    argvs = {"Dockerfile CMD": exec_form(last("CMD"))}
    for name, service in nimbus_services().items():
        assert "entrypoint" not in service, f"compose service {name} overrides the entrypoint"
        argvs[f"compose {name}"] = list(service["command"])
    for deployment in k8s_resources("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            where = f"k8s {deployment['metadata']['name']}/{container['name']}"
            assert "command" not in container, f"{where} overrides the image's entrypoint"
            argvs[where] = list(container["args"])
    return argvs


def listen_port(argv: list[str], env: dict[str, str]) -> int:
    """The port a ``nimbus`` process started as ``argv`` with ``env`` serves HTTP on."""
    if "--port" in argv:
        return int(argv[argv.index("--port") + 1])
    if argv[0] == "worker":
        return int(env.get("NIMBUS_WORKER_PORT", WORKER_PORT))
    return int(env.get("NIMBUS_PORT", API_PORT))
