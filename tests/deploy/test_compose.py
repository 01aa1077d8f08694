"""docker-compose.yml, checked without a Docker engine: the compose-spec schema (as
check-jsonschema ships it), then cross-checks against the Dockerfiles, the settings, the
app's routes and the Prometheus and Grafana files it mounts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from tests.deploy.deploy_assets import (
    COMPOSE_FILE,
    ROOT,
    app_paths,
    compose,
    compose_env,
    compose_service,
    settings_env_names,
    settings_from_env,
    url_paths,
)

SERVICES = {"trainer", "simmer", "redis", "prometheus", "grafana"}


def mounts(service: str, kind: str) -> list[dict[str, Any]]:
    return [m for m in compose_service(service).get("volumes", []) if m["type"] == kind]


def volume_holding(service: str, path: str) -> dict[str, Any]:
    """The named-volume mount of `service` that contains `path`."""
    found = [
        m
        for m in mounts(service, "volume")
        if PurePosixPath(path).is_relative_to(PurePosixPath(m["target"]))
    ]
    assert len(found) == 1, f"{service}: {path} is on no named volume"
    return found[0]


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stack_runs_the_five_services() -> None:
    assert set(compose()["services"]) == SERVICES


def test_server_starts_after_training_succeeded_and_redis_is_healthy() -> None:
    depends = compose_service("simmer")["depends_on"]
    assert depends["trainer"]["condition"] == "service_completed_successfully"
    assert depends["redis"]["condition"] == "service_healthy"
    assert compose_service("trainer")["restart"] == "no"


def test_trainer_hands_the_bundle_to_the_server_through_one_volume() -> None:
    written = compose_env("trainer")["BUNDLE"]
    served = compose_env("simmer")["SIMMER_BUNDLE"]
    trainer_mount = volume_holding("trainer", written)
    server_mount = volume_holding("simmer", served)
    assert trainer_mount["source"] == server_mount["source"]
    assert PurePosixPath(written).relative_to(trainer_mount["target"]) == PurePosixPath(
        served
    ).relative_to(server_mount["target"])
    assert server_mount.get("read_only") is True
    assert trainer_mount.get("read_only") is not True


def test_server_environment_is_valid_settings_using_the_redis_service() -> None:
    env = compose_env("simmer")
    assert set(env) <= settings_env_names(), set(env) - settings_env_names()
    settings = settings_from_env(env)
    assert settings.store == "redis"
    redis_url = urlsplit(settings.redis_url)
    assert redis_url.hostname == "redis" and redis_url.port == 6379
    assert settings.host == "0.0.0.0"


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name in SERVICES - {"trainer"}:  # the trainer is one-shot
        check = compose_service(name).get("healthcheck", {})
        assert check.get("test"), f"{name} has no healthcheck"


def test_server_healthcheck_asks_a_route_the_app_serves_on_its_port() -> None:
    command = " ".join(compose_service("simmer")["healthcheck"]["test"])
    paths = url_paths(command)
    assert paths == ["/readyz"]
    assert set(paths) <= app_paths()
    port = compose_env("simmer")["SIMMER_PORT"]
    assert f"127.0.0.1:{port}/" in command


def test_published_ports_are_named_and_reach_the_listeners() -> None:
    listeners = {
        "simmer": int(compose_env("simmer")["SIMMER_PORT"]),
        "prometheus": 9090,
        "grafana": 3000,
    }
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, dict) and port.get("name"), f"{name}: name every port"
            assert port["target"] == listeners[name], name


def test_every_volume_is_named_and_declared() -> None:
    declared = compose()["volumes"]
    for name, service in compose()["services"].items():
        for mount in service.get("volumes", []):
            assert isinstance(mount, dict), f"{name}: use the long volume syntax"
            if mount["type"] == "volume":
                assert mount["source"] in declared, f"{name}: undeclared volume {mount['source']}"
            elif mount["type"] == "bind":
                assert (ROOT / mount["source"]).exists(), f"{name}: missing {mount['source']}"
    for key, volume in declared.items():
        assert volume and volume.get("name"), f"volume {key} needs a fixed name"


def test_images_are_built_from_the_deploy_dockerfiles() -> None:
    for name, dockerfile in [("trainer", "Dockerfile.train"), ("simmer", "Dockerfile.serve")]:
        build = compose_service(name)["build"]
        assert build["context"] == "."
        assert (ROOT / build["dockerfile"]).resolve() == (ROOT / "deploy" / dockerfile).resolve()


def test_prometheus_reads_the_mounted_deploy_config() -> None:
    service = compose_service("prometheus")
    (bind,) = mounts("prometheus", "bind")
    assert (ROOT / bind["source"]).resolve() == (ROOT / "deploy" / "prometheus").resolve()
    config = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file="))
    relative = PurePosixPath(config).relative_to(bind["target"])
    assert (ROOT / bind["source"] / relative).is_file()
    storage = next(
        a.split("=", 1)[1] for a in service["command"] if a.startswith("--storage.tsdb.path=")
    )
    assert volume_holding("prometheus", storage)["source"] == "prometheus-data"
