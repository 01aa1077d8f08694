"""deploy/grafana: the dashboard covers every signal the issue names, reads only metrics
the service exposes, and is provisioned where compose mounts it."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from tests.deploy.deploy_assets import (
    DASHBOARD_FILE,
    GRAFANA_DIR,
    ROOT,
    alert_rules,
    compose_env,
    compose_service,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    exposed_metric_names,
    load_yaml,
    metric_families,
    referenced_metrics,
)

DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "simmer.yml"


def panel_exprs(title: str) -> list[str]:
    panels = [p for p in dashboard_panels() if p["title"] == title]
    assert len(panels) == 1, f"expected one panel titled {title!r}"
    return [t["expr"] for t in panels[0]["targets"]]


def quantiles_of(exprs: list[str], metric: str) -> set[str]:
    return {
        m.group(1)
        for e in exprs
        if (m := re.match(rf"histogram_quantile\(([0-9.]+), .*\b{metric}_bucket\b", e))
    }


def test_latency_panels_show_p50_p95_p99() -> None:
    for title, metric in [
        ("Time to first token", "simmer_time_to_first_token_seconds"),
        ("Inter-token latency", "simmer_inter_token_latency_seconds"),
        ("End-to-end latency", "simmer_e2e_request_latency_seconds"),
    ]:
        assert quantiles_of(panel_exprs(title), metric) == {"0.5", "0.95", "0.99"}, title


def test_dashboard_has_a_panel_for_each_signal() -> None:
    wanted = {
        "Tokens / s": ["simmer_prompt_tokens_total", "simmer_generation_tokens_total"],
        "Requests running and waiting": [
            "simmer_num_requests_running",
            "simmer_num_requests_waiting",
        ],
        "Batch size": ["simmer_batch_size"],
        "Engine step time": ["simmer_engine_step_seconds"],
        "Sessions active": ["simmer_sessions_active"],
        "Sessions created and evicted / s": [
            "simmer_sessions_created_total",
            "simmer_sessions_evicted_total",
        ],
        "Errors / s by code": ["simmer_request_failure_total"],
        "WebSocket connections": ["simmer_websocket_connections"],
        "Session resumes / s by source": ["simmer_session_resume_total"],
    }
    for title, metrics in wanted.items():
        text = " ".join(panel_exprs(title))
        for metric in metrics:
            assert metric in text, f"{title!r} should plot {metric}"
    assert "by (reason)" in " ".join(panel_exprs("Sessions created and evicted / s"))
    assert "by (code)" in " ".join(panel_exprs("Errors / s by code"))
    assert "by (source)" in " ".join(panel_exprs("Session resumes / s by source"))


def test_every_metric_the_service_declares_is_on_the_dashboard() -> None:
    used = set().union(*(referenced_metrics(expr) for _, expr in dashboard_queries()))
    for family, kind in metric_families().items():
        names = {family, f"{family}_total", f"{family}_bucket", f"{family}_sum", f"{family}_info"}
        assert names & used, f"{family} ({kind}) is on no dashboard panel"


def test_dashboards_and_alerts_read_only_metrics_the_service_exposes() -> None:
    exprs = [expr for _, expr in dashboard_queries()] + [rule["expr"] for rule in alert_rules()]
    known = exposed_metric_names() | {"up"}
    for expr in exprs:
        unknown = referenced_metrics(expr) - known
        assert unknown == set(), f"{expr!r} reads metrics the service does not expose: {unknown}"


def test_panels_and_targets_use_the_datasource_variable_defaulting_to_the_provisioned_one() -> None:
    (provisioned,) = load_yaml(DATASOURCES)["datasources"]
    assert provisioned["type"] == "prometheus"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == provisioned["uid"]
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_datasource_points_at_the_compose_prometheus_and_its_scrape_interval() -> None:
    (provisioned,) = load_yaml(DATASOURCES)["datasources"]
    url = urlsplit(provisioned["url"])
    prometheus = compose_service("prometheus")
    assert url.hostname == "prometheus"
    assert url.port in {port["target"] for port in prometheus["ports"]}
    scrape = load_yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")["scrape_configs"]
    (simmer,) = [job for job in scrape if job["job_name"] == "simmer"]
    assert provisioned["jsonData"]["timeInterval"] == simmer["scrape_interval"]


def test_dashboard_provider_reads_the_folder_compose_mounts_the_dashboard_into() -> None:
    (provider,) = load_yaml(PROVIDERS)["providers"]
    mounts = {
        m["target"]: m["source"]
        for m in compose_service("grafana")["volumes"]
        if m["type"] == "bind"
    }
    source = mounts[provider["options"]["path"]]
    assert (ROOT / source / DASHBOARD_FILE.name).resolve() == DASHBOARD_FILE.resolve()
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == (GRAFANA_DIR / "provisioning")
    home = PurePosixPath(compose_env("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == PurePosixPath(provider["options"]["path"]) / DASHBOARD_FILE.name


def test_panel_ids_are_unique_and_panels_fit_the_grid() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    assert dashboard()["uid"] == "simmer"
