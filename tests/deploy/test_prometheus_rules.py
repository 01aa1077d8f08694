"""deploy/prometheus: promtool accepts the configs and rules, the alert unit tests pass,
and the scrape configs point at what compose and the manifests actually run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_assets import (
    PROMETHEUS_DIR,
    ROOT,
    adapter_rules,
    alert_rules,
    app_paths,
    compose_env,
    k8s_object,
    load_yaml,
    require_binary,
)


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def simmer_job(config: dict[str, Any]) -> dict[str, Any]:
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "simmer"]
    assert len(jobs) == 1, "each Prometheus config needs exactly one job named simmer"
    job: dict[str, Any] = jobs[0]
    return job


def test_promtool_accepts_the_compose_prometheus_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_kubernetes_prometheus_config(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes service discovery, so the pod
    discovery is swapped for a static target; everything else is checked as written."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus-k8s.yml")
    job = simmer_job(config)
    assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
    job["static_configs"] = [{"targets": ["simmer-0:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts without a unit test that makes them fire"


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert 'job="simmer"' in rule["expr"], f"{rule['alert']} should select the simmer job"


def test_server_error_codes_in_the_error_ratio_alert_exist_in_the_service() -> None:
    """The alert counts server-side codes by name; a renamed code would silently drop out."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "SimmerHighErrorRatio"]
    match = re.search(r'code=~"([^"]+)"', rule["expr"])
    assert match, "SimmerHighErrorRatio should select server-side codes with code=~"
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    missing = [code for code in match.group(1).split("|") if f'"{code}"' not in source]
    assert missing == [], f"codes the service never raises: {missing}"


def test_compose_prometheus_scrapes_the_simmer_service_on_its_port() -> None:
    job = simmer_job(load_yaml(PROMETHEUS_DIR / "prometheus.yml"))
    (static,) = job["static_configs"]
    assert static["targets"] == [f"simmer:{compose_env('simmer')['SIMMER_PORT']}"]
    assert job.get("metrics_path", "/metrics") in app_paths()


def test_kubernetes_prometheus_keeps_the_deployment_pods_and_labels_them_for_the_adapter() -> None:
    job = simmer_job(load_yaml(PROMETHEUS_DIR / "prometheus-k8s.yml"))
    template = k8s_object("Deployment", "simmer")["spec"]["template"]
    labels = template["metadata"]["labels"]
    container_ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
    meta = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
        for k, v in labels.items()
    }
    meta.update({"__meta_kubernetes_pod_container_port_name": "http"})
    for relabel in job["relabel_configs"]:
        if relabel.get("action") == "keep":
            value = ";".join(meta.get(label, "") for label in relabel["source_labels"])
            assert re.fullmatch(relabel["regex"], value), f"the Deployment's pods fail {relabel}"
    assert "http" in container_ports
    added = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    for rule in adapter_rules():
        assert set(rule["resources"]["overrides"]) <= added, "the adapter maps labels nobody adds"
    assert job["metrics_path"] in app_paths()


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-k8s.yml"])
def test_prometheus_configs_load_the_alert_rules(config: str) -> None:
    rule_files = load_yaml(PROMETHEUS_DIR / config)["rule_files"]
    assert rule_files == ["alerts.yml"]
