"""deploy/compose.yaml: valid Compose, and consistent with itself and with the image.

No Docker engine here: the file is checked against the Compose Specification's JSON schema
(vendored in check-jsonschema) and its values against each other; the edge's nginx
configuration is checked by ``nginx -t`` where an nginx binary is at hand.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.deploy.files import (
    COMPOSE,
    DOCKERFILE,
    compose,
    compose_env,
    listen_port,
    nimbus_services,
)

SHUTDOWN_GRACE_S = 10.0  # NIMBUS_SHUTDOWN_GRACE_S's default
UVICORN_EXTRA_S = 5  # `nimbus serve` gives uvicorn the grace plus this


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_spec_schema() -> None:
    result = _check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_schema_is_not_vacuous(tmp_path: Path) -> None:
    """A misspelt key in the same file fails the same check."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_perod:"))
    result = _check_jsonschema(bad)
    assert result.returncode != 0 and "stop_grace_perod" in result.stdout


def test_nimbus_services() -> None:
    services = nimbus_services()
    assert set(services) == {"api", "worker"}
    assert services["api"]["command"] == ["serve", "--api-only"]
    assert services["worker"]["command"][0] == "worker"
    for service in services.values():
        assert service["deploy"]["replicas"] == 2


def test_nimbus_services_share_the_env_anchor() -> None:
    shared = compose()["x-nimbus-env"]
    for name, service in nimbus_services().items():
        assert service["environment"] == shared, name


def test_image_is_built_from_the_dockerfile() -> None:
    for name, service in nimbus_services().items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert set(build.get("args", {})) <= {"EXTRAS"}


def test_started_once_dependencies_are_healthy() -> None:
    services = compose()["services"]
    for name, service in nimbus_services().items():
        depends_on = service["depends_on"]
        assert set(depends_on) == {"postgres", "redis"}, name
        for dependency, condition in depends_on.items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency], dependency
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"


def test_urls_name_the_services() -> None:
    services = compose()["services"]
    env = compose_env(nimbus_services()["api"])
    database = urlsplit(env["NIMBUS_DATABASE_URL"])
    postgres = services["postgres"]["environment"]
    assert database.scheme == "postgresql" and database.hostname == "postgres"
    assert (database.username, database.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert database.path == "/" + postgres["POSTGRES_DB"]
    assert urlsplit(env["NIMBUS_REDIS_URL"]).hostname == "redis"


def test_postgres_has_room_for_every_pool() -> None:
    """Each process opens up to 3 x NIMBUS_DATABASE_POOL_SIZE connections, plus a listener and
    a worker's liveness lock (docs/deployment.md)."""
    services = compose()["services"]
    command = services["postgres"]["command"]
    max_connections = int(command[command.index("-c") + 1].split("=")[1])
    env = compose_env(nimbus_services()["api"])
    processes = sum(s["deploy"]["replicas"] for s in nimbus_services().values())
    assert processes * (3 * int(env["NIMBUS_DATABASE_POOL_SIZE"]) + 2) < max_connections


def test_no_default_admin_key() -> None:
    """The stack refuses to start rather than come up with a well-known admin key."""
    assert re.fullmatch(
        r"\$\{NIMBUS_ADMIN_KEY:\?.+\}", compose()["x-nimbus-env"]["NIMBUS_ADMIN_KEY"]
    )


def test_stop_grace_period_exceeds_the_shutdown_grace() -> None:
    for name, service in nimbus_services().items():
        env = compose_env(service)
        grace = float(env.get("NIMBUS_SHUTDOWN_GRACE_S", SHUTDOWN_GRACE_S))
        period = service["stop_grace_period"]
        assert period.endswith("s") and period[:-1].isdigit(), period
        assert int(period[:-1]) > grace + UVICORN_EXTRA_S, name


def test_replicated_services_publish_no_fixed_port() -> None:
    """Two replicas cannot bind one host port: only the single edge publishes."""
    for name, service in compose()["services"].items():
        if service.get("deploy", {}).get("replicas", 1) > 1:
            assert "ports" not in service, name
    assert compose()["services"]["edge"]["ports"] == ["8123:8123"]


def _edge_config() -> str:
    return compose()["configs"]["edge-nginx"]["content"].replace("$$", "$")


def test_edge_forwards_to_the_api_port() -> None:
    config = _edge_config()
    api = nimbus_services()["api"]
    port = listen_port(api["command"], compose_env(api))
    assert f"http://api:{port}" in config
    published = compose()["services"]["edge"]["ports"][0].split(":")[-1]
    assert f"listen {published};" in config
    assert "proxy_buffering off;" in config, "SSE streams must not be buffered"


def test_edge_nginx_config(tmp_path: Path) -> None:
    """``nginx -t`` on the edge's configuration, inside an http block as in the nginx image."""
    nginx = os.environ.get("NGINX") or shutil.which("nginx")
    if nginx is None:
        pytest.skip("no nginx binary (set NGINX=/path/to/nginx)")
    (tmp_path / "default.conf").write_text(_edge_config())
    temp_paths = " ".join(
        f"{kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{ access_log off; {temp_paths} include {tmp_path}/default.conf; }}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_yaml_anchors_are_defined_once() -> None:
    """The shared blocks exist as anchors, not as copies that drift apart."""
    text = COMPOSE.read_text()
    assert text.count("&nimbus-env") == 1 and text.count("*nimbus-env") == 1
    assert text.count("<<: *nimbus") == len(nimbus_services())
