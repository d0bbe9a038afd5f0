"""deploy/k8s, and what every deployment file says about Nimbus.

Kubernetes (no cluster here): each manifest validates, strictly (an unknown field fails),
against the bundled JSON schemas of Kubernetes 1.30 and of the newest release that
kubernetes-validate ships, offline; the kustomization lists every manifest and, where kubectl
is installed, builds; the resources agree with each other (selectors, ports, probes, names).

Every file: the ``nimbus`` command lines it runs exist in the CLI, the environment variables
it sets are Nimbus settings that accept the values given, and its YAML passes yamllint.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from pydantic import AliasChoices, TypeAdapter
from typer.main import get_command
from yamllint import linter
from yamllint.config import YamlLintConfig

from nimbus.settings import Settings
from tests.deploy.files import (
    DEPLOY,
    K8S,
    MIN_KUBERNETES,
    compose_env,
    dockerfile,
    k8s_env,
    k8s_manifests,
    k8s_resources,
    kustomization,
    last,
    listen_port,
    nimbus_argvs,
    nimbus_services,
)

KUBERNETES_VERSIONS = [MIN_KUBERNETES, f"{latest_version()}.0"]
SHUTDOWN_GRACE_S = 10.0  # NIMBUS_SHUTDOWN_GRACE_S's default
UVICORN_EXTRA_S = 5  # `nimbus serve` gives uvicorn the grace plus this


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_resources("Deployment")}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _container_port(container: dict[str, Any], port: int | str) -> int:
    """The number of a container port given by number or by name."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} declares no port {port!r}")


# --- schemas and the kustomization ----------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", sorted(k8s_manifests()))
def test_manifest_matches_the_kubernetes_schema(manifest: str, version: str) -> None:
    resources = k8s_manifests()[manifest]
    assert resources, f"{manifest} holds no resource"
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest}: {exc.message}")


def test_schema_check_is_not_vacuous() -> None:
    """A misspelt field and a wrongly typed value are both refused."""
    deployment = copy.deepcopy(_deployments()["nimbus-api"])
    container = _container(deployment)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, MIN_KUBERNETES, strict=True)
    hpa = copy.deepcopy(k8s_resources("HorizontalPodAutoscaler")[0])
    hpa["spec"]["minReplicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError, match="minReplicas"):
        kubernetes_validate.validate(hpa, MIN_KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == set(k8s_manifests())


def test_kustomization_sets_every_image() -> None:
    named = {image["name"] for image in kustomization()["images"]}
    for deployment in _deployments().values():
        assert _container(deployment)["image"] in named


def test_kustomize_build_validates() -> None:
    """What `kubectl apply -k deploy/k8s` would send, built by kubectl's own kustomize."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(built) == len(k8s_resources())
    images = {
        i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kustomization()["images"]
    }
    for resource in built:
        kubernetes_validate.validate(resource, MIN_KUBERNETES, strict=True)
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nimbus"
        if resource["kind"] == "Deployment":
            assert _container(resource)["image"] == images["nimbus"]


# --- the resources agree with each other and with Nimbus ------------------------------------


def test_deployments() -> None:
    deployments = _deployments()
    assert set(deployments) == {"nimbus-api", "nimbus-worker"}
    assert _container(deployments["nimbus-api"])["args"] == ["serve", "--api-only"]
    assert _container(deployments["nimbus-worker"])["args"][0] == "worker"
    for deployment in deployments.values():
        assert deployment["spec"]["replicas"] == 2
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


@pytest.mark.parametrize("name", ["nimbus-api", "nimbus-worker"])
def test_probes_ask_ok_on_the_port_nimbus_listens_on(name: str) -> None:
    deployment = _deployments()[name]
    container = _container(deployment)
    port = listen_port(container["args"], k8s_env())
    assert _container_port(container, port) == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == "/ok", probe
        assert _container_port(container, http_get["port"]) == port, probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_services_select_a_deployment_port() -> None:
    for service in k8s_resources("Service"):
        selector = service["spec"]["selector"]
        selected = [
            d
            for d in _deployments().values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            _container_port(_container(selected[0]), port["targetPort"])


def test_autoscalers_and_budgets_target_the_deployments() -> None:
    deployments = _deployments()
    for hpa in k8s_resources("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["apiVersion"]) == ("Deployment", "apps/v1")
        assert target["name"] in deployments
        assert hpa["spec"]["minReplicas"] <= deployments[target["name"]]["spec"]["replicas"]
    budgets = k8s_resources("PodDisruptionBudget")
    assert len(budgets) == len(deployments)
    for budget in budgets:
        labels = budget["spec"]["selector"]["matchLabels"]
        assert labels == deployments[budget["metadata"]["name"]]["spec"]["selector"]["matchLabels"]


def test_api_scales_on_cpu_and_workers_on_the_queue() -> None:
    hpas = {h["metadata"]["name"]: h["spec"] for h in k8s_resources("HorizontalPodAutoscaler")}
    (cpu,) = hpas["nimbus-api"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    metrics = {m["type"]: m for m in hpas["nimbus-worker"]["metrics"]}
    queue = metrics["External"]["external"]
    assert queue["metric"]["name"] == "nimbus_queue_depth"
    assert queue["target"]["type"] == "AverageValue"
    in_flight = metrics["Pods"]["pods"]
    assert in_flight["metric"]["name"] == "nimbus_runs_running"
    # Its target is a fraction of what one worker runs at once.
    args = _container(_deployments()["nimbus-worker"])["args"]
    concurrency = int(args[args.index("--concurrency") + 1])
    assert 0 < int(in_flight["target"]["averageValue"]) < concurrency


def _hpa_metric_names() -> list[str]:
    names = []
    for hpa in k8s_resources("HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            source = metric[metric["type"].lower()]
            if metric["type"] in ("External", "Pods", "Object"):
                names.append(source["metric"]["name"])
    return names


@pytest.mark.parametrize("metric", _hpa_metric_names())
def test_autoscaler_metrics_are_nimbus_metrics(metric: str) -> None:
    """The HPA scales on series the workers' /metrics really exports."""
    from nimbus.service.metrics import METRICS

    exported = {family.name for family in METRICS.registry.collect()}
    assert metric in exported, f"{metric} is not among Nimbus's metrics: {sorted(exported)}"


@pytest.mark.parametrize("name", ["nimbus-api", "nimbus-worker"])
def test_termination_grace_exceeds_the_shutdown_grace(name: str) -> None:
    pod = _deployments()[name]["spec"]["template"]["spec"]
    container = _container(_deployments()[name])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop_s = int(pre_stop[1]) if pre_stop and pre_stop[0] == "sleep" else 0
    grace = float(k8s_env().get("NIMBUS_SHUTDOWN_GRACE_S", SHUTDOWN_GRACE_S))
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + grace + UVICORN_EXTRA_S


@pytest.mark.parametrize("name", ["nimbus-api", "nimbus-worker"])
def test_pods_run_unprivileged_on_a_read_only_root(name: str) -> None:
    pod = _deployments()[name]["spec"]["template"]["spec"]
    container = _container(_deployments()[name])
    image_uid, image_gid = (int(n) for n in last("USER").value.split(":"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    assert pod["securityContext"]["runAsGroup"] == image_gid
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


@pytest.mark.parametrize("name", ["nimbus-api", "nimbus-worker"])
def test_no_service_links(name: str) -> None:
    """Kubernetes would put NIMBUS_WORKER_PORT=tcp://...:8124 (from the Service nimbus-worker)
    into every pod's environment, where Nimbus reads it as a setting."""
    services = [s["metadata"]["name"] for s in k8s_resources("Service")]
    assert "nimbus-worker" in services  # what makes this matter
    assert _deployments()[name]["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("name", ["nimbus-api", "nimbus-worker"])
def test_env_comes_from_the_config_map_and_the_secret(name: str) -> None:
    sources = _container(_deployments()[name])["envFrom"]
    assert {s["configMapRef"]["name"] for s in sources if "configMapRef" in s} == {
        c["metadata"]["name"] for c in k8s_resources("ConfigMap")
    }
    assert {s["secretRef"]["name"] for s in sources if "secretRef" in s} == {
        s["metadata"]["name"] for s in k8s_resources("Secret")
    }


def test_secret_holds_placeholders_only() -> None:
    (secret,) = k8s_resources("Secret")
    assert "data" not in secret
    assert set(secret["stringData"]) == {
        "NIMBUS_DATABASE_URL",
        "NIMBUS_ADMIN_KEY",
        "OPENAI_API_KEY",
    }
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, key
    config_map = k8s_env().keys() - secret["stringData"].keys()
    assert not {k for k in config_map if re.search("KEY|PASSWORD|TOKEN|SECRET", k)}


# --- environment variables are Nimbus settings ----------------------------------------------


def _env_names() -> dict[str, str]:
    """Upper-case environment variable name -> the Settings field it sets."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None:
            names[f"{prefix}{field_name}".upper()] = field_name
        elif isinstance(alias, str):
            names[alias.upper()] = field_name
        elif isinstance(alias, AliasChoices):
            names.update({c.upper(): field_name for c in alias.choices if isinstance(c, str)})
    return names


def _deploy_env() -> dict[str, dict[str, str]]:
    """Every Nimbus environment variable the deployment files set: name -> {where: value}."""
    found: dict[str, dict[str, str]] = {}

    def add(where: str, env: dict[str, str]) -> None:
        for name, value in env.items():
            if name.startswith(("NIMBUS_", "OPENAI_")):
                found.setdefault(name, {})[where] = str(value)

    add("Dockerfile", dockerfile().envs)
    for service_name, service in nimbus_services().items():
        add(f"compose {service_name}", compose_env(service))
    add("k8s", k8s_env())
    return found


@pytest.mark.parametrize("name", sorted(_deploy_env()))
def test_env_var_is_a_nimbus_setting(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    field = _env_names().get(name.upper())
    assert field is not None, f"{name} (set in {', '.join(_deploy_env()[name])}) is no setting"
    annotation = Settings.model_fields[field].annotation
    for variable in list(os.environ):
        if variable.upper().startswith(("NIMBUS_", "OPENAI_")):
            monkeypatch.delenv(variable)
    for where, value in _deploy_env()[name].items():
        monkeypatch.setenv(name, value)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        # an empty value (compose's `${OPENAI_API_KEY:-}`) means unset: the default
        expected = (
            Settings.model_fields[field].default
            if value == ""
            else TypeAdapter(annotation).validate_python(value)
        )
        assert getattr(settings, field) == expected, f"{name}={value!r} in {where}"


def test_compose_and_k8s_agree_on_the_shared_settings() -> None:
    """Lease TTL and shutdown grace are the same for every process in both setups."""
    env = _deploy_env()
    for name in ("NIMBUS_LEASE_TTL_S", "NIMBUS_SHUTDOWN_GRACE_S", "NIMBUS_DATABASE_POOL_SIZE"):
        assert len(set(env[name].values())) == 1, (name, env[name])


# --- command lines exist in the CLI ---------------------------------------------------------


def _nimbus() -> str:
    nimbus = shutil.which("nimbus", path=str(Path(sys.executable).parent)) or shutil.which("nimbus")
    assert nimbus is not None, "the nimbus script is not installed (pip install -e .)"
    return nimbus


def test_nimbus_help_lists_the_subcommands() -> None:
    result = subprocess.run([_nimbus(), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^\s{2}(\w[\w-]*)\s", result.stdout.split("Commands:")[1], re.M))
    used = {argv[0] for argv in nimbus_argvs().values()}
    assert used <= listed, f"missing from `nimbus --help`: {sorted(used - listed)}"


@pytest.mark.parametrize("where", sorted(nimbus_argvs()))
def test_command_line_is_accepted(where: str) -> None:
    """`nimbus <cmd> --help` names each flag, and the CLI's parser takes the whole line."""
    argv = nimbus_argvs()[where]
    result = subprocess.run(
        [_nimbus(), argv[0], "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"nimbus {argv[0]} --help: {result.stdout}{result.stderr}"
    for flag in (word.split("=")[0] for word in argv[1:] if word.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), flag

    from nimbus.adapters.cli.main import app

    group = get_command(app)  # Typer's click (vendored in recent Typer), not click's
    command = group.get_command(group.context_class(group), argv[0])  # type: ignore[attr-defined]
    assert command is not None
    command.make_context(argv[0], list(argv[1:]))  # raises on unknown options or bad values


# --- YAML style -----------------------------------------------------------------------------

YAMLLINT = YamlLintConfig(
    "extends: default\n"
    "rules:\n"
    "  line-length: {max: 100}\n"
    "  document-start: disable\n"  # single-document files
)


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml"))
)
def test_yamllint(path: str) -> None:
    problems = list(linter.run((DEPLOY / path).read_text(), YAMLLINT, str(DEPLOY / path)))
    assert not problems, "\n".join(f"{p.line}:{p.column} {p.message} ({p.rule})" for p in problems)
