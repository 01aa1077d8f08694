"""The deploy assets as data: compose, manifests, Prometheus and Grafana files, and the
facts about the service they must agree with (routes, settings, exposed metrics)."""

from __future__ import annotations

import json
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
K8S_DIR = DEPLOY / "k8s"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "simmer.json"
ADAPTER_VALUES = K8S_DIR / "prometheus-adapter" / "values.yaml"
OPERATOR_DOCS = ROOT / "README.md"  # its "Operators" section
JOB = "simmer"


def require_binary(name: str) -> str:
    """The path of a Debian tool the deploy tests drive; a clear failure when it is missing."""
    path = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
    )
    if path is None:
        pytest.fail(
            f"{name} is not installed: run `make system-deps` (it installs Debian's prometheus)"
        )
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return data


def compose_service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose()["services"][name]
    return service


def compose_env(name: str) -> dict[str, str]:
    env = compose_service(name).get("environment", {})
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


@cache
def k8s_manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every YAML document directly under deploy/k8s."""
    return tuple(
        (path.name, doc) for path in sorted(K8S_DIR.glob("*.yaml")) for doc in load_yaml_docs(path)
    )


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc for _, doc in k8s_manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


@cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return [p for p in panels if p.get("type") != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with Grafana variables) for every dashboard target."""
    return [
        (f"{panel['title']} / {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]:
        rules.extend(group["rules"])
    return rules


def adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = load_yaml(ADAPTER_VALUES)["rules"]["custom"]
    return rules


def adapter_series_name(rule: dict[str, Any]) -> str:
    """The metric an adapter rule's seriesQuery selects (`name{labels}` -> `name`)."""
    match = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*", rule["seriesQuery"])
    assert match, f"seriesQuery should be one selector: {rule['seriesQuery']!r}"
    return str(match.group(1))


def grafana_to_promql(expr: str, rate_interval: str = "5m") -> str:
    """A dashboard query as Grafana sends it for job=simmer and all instances; the default
    rate window covers the whole life of a test Prometheus."""
    out = (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__interval", rate_interval)
        .replace("$__range", rate_interval)
        .replace("$job", JOB)
        .replace("$instance", ".*")
    )
    assert "$" not in out, f"unsubstituted Grafana variable in {expr!r}"
    return out


def adapter_to_promql(rule: dict[str, Any], group_by: str = "instance") -> str:
    """An adapter metricsQuery as prometheus-adapter sends it, for job=simmer."""
    query: str = rule["metricsQuery"]
    return (
        query.replace("<<.Series>>", adapter_series_name(rule))
        .replace("<<.LabelMatchers>>", f'job="{JOB}"')
        .replace("<<.GroupBy>>", group_by)
    )


_METRIC_NAME = re.compile(r"\b(simmer_[a-z0-9_]+|up)\b(?!\s*\()")


def referenced_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (simmer_* and up), by name."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(_METRIC_NAME.findall(without_strings))


@cache
def exposed_metric_names() -> frozenset[str]:
    """Every series name a service's registry can expose (counters with `_total`)."""
    from service.metrics import Metrics

    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
        "info": ("_info",),
    }
    names = set()
    for family in Metrics().registry.collect():
        for suffix in suffixes[family.type]:
            names.add(family.name + suffix)
    return frozenset(names)


@cache
def metric_families() -> dict[str, str]:
    """Family name -> its type, for every metric the service declares."""
    from service.metrics import Metrics

    return {family.name: family.type for family in Metrics().registry.collect()}


@cache
def app_paths() -> frozenset[str]:
    """The route paths of the app, built through the service's own factory."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings())
    return frozenset(route.path for route in app.routes)


def settings_env_names() -> set[str]:
    from service.settings import Settings

    return {f"SIMMER_{name.upper()}" for name in Settings.model_fields}


def settings_from_env(env: dict[str, str]) -> Any:
    """The Settings a container gets from these SIMMER_* variables (validated)."""
    from service.settings import Settings

    values = {key.removeprefix("SIMMER_").lower(): value for key, value in env.items()}
    return Settings.model_validate(values)


def url_paths(text: str) -> list[str]:
    """The path of every http:// URL in a command line or probe."""
    return [urlsplit(url).path for url in re.findall(r"https?://[^\s'\"]+", text)]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]
