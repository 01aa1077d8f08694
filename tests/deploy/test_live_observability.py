"""A real Prometheus scraping a real server: every dashboard query, alert expression and
adapter rule is evaluated through Prometheus's HTTP API after HTTP JSON, SSE, WebSocket,
OpenAI and failing requests; `promtool check metrics` lints the live exposition.

One server (Redis store, as in compose) and one Prometheus serve the whole module.
Prometheus reads a copy of deploy/prometheus/prometheus.yml with a 1 s scrape interval,
the server's port as the simmer target, and the real alerts.yml.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from harness.server import free_port
from tests.conftest import ServerProcess
from tests.deploy.deploy_assets import (
    JOB,
    PROMETHEUS_DIR,
    adapter_rules,
    adapter_to_promql,
    alert_rules,
    dashboard,
    dashboard_queries,
    grafana_to_promql,
    load_yaml,
    referenced_metrics,
    require_binary,
)

DEADLINE_S = 30.0


@dataclass
class Prometheus:
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.base_url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", f"{promql}: {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not check():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus never saw {what}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def wait_for_value(self, promql: str, at_least: float) -> None:
        def reached() -> bool:
            value = self.value(promql)
            return value is not None and value >= at_least

        self.wait_for(f"{promql} >= {at_least}", reached)


def scraped_value(server: ServerProcess, name: str) -> float:
    """The sum of a series family's samples as the server exposes them right now."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


@pytest.fixture(scope="module")
def prometheus(
    redis_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    job = config["scrape_configs"][0]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{redis_server.port}"]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{prom.base_url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        prom.wait_for("its own readiness", ready)
        prom.wait_for_value(f'up{{job="{JOB}"}}', 1)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(server: ServerProcess, path: str, body: dict[str, Any], status: int = 200) -> Any:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    return response.json() if response.content else None


@pytest.fixture(scope="module")
def traffic(redis_server: ServerProcess, prometheus: Prometheus) -> ServerProcess:
    """Every kind of request, each seen by Prometheus before the tests read it back."""
    server = redis_server
    # ignore_eos: every generation runs its length, so there are gaps between tokens to
    # time (a run that ends at once gives the inter-token histogram nothing); the stream
    # is long, so even a loaded machine sends it in more than one event
    post(
        server,
        "/v1/generate",
        {"prompt": "recipe for apple pie |", "max_tokens": 12, "ignore_eos": True},
    )
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/generate",
        json={"prompt": "recipe for soup |", "max_tokens": 400, "stream": True, "ignore_eos": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
        ]
    assert events[-1]["type"] == "done"
    post(server, "/v1/completions", {"model": "simmer-lstm", "prompt": "stew |", "max_tokens": 8})
    session = post(server, "/v1/sessions", {}, status=201)
    assert httpx.delete(f"{server.base_url}/v1/sessions/{session['session_id']}").status_code == 204

    with connect(f"ws://127.0.0.1:{server.port}/v1/stream") as ws:
        for prompt in ("recipe for bread |", " more"):
            ws.send(json.dumps({"type": "generate", "prompt": prompt, "max_tokens": 10}))
            while (event := json.loads(ws.recv(timeout=30)))["type"] not in ("done", "error"):
                pass
            assert event["type"] == "done", event
        # the connection gauge is read while the socket is open
        prometheus.wait_for_value(f'simmer_websocket_connections{{job="{JOB}"}}', 1)

    # Two failures a scrape apart, so the failure series has an increase to rate.
    bad = {"prompt": "x", "max_tokens": 0}
    post(server, "/v1/generate", bad, status=422)
    prometheus.wait_for_value(f'sum(simmer_request_failure_total{{job="{JOB}"}})', 1)
    post(server, "/v1/generate", bad, status=422)

    for name in ("simmer_request_success_total", "simmer_request_failure_total"):
        prometheus.wait_for_value(f'sum({name}{{job="{JOB}"}})', scraped_value(server, name))
    prometheus.wait_for_value(
        f'sum(simmer_sessions_evicted_total{{job="{JOB}",reason="explicit"}})', 1
    )
    return server


def test_traffic_reaches_the_request_metrics(
    traffic: ServerProcess, prometheus: Prometheus
) -> None:
    """JSON, SSE, OpenAI and two WebSocket generations succeeded; two requests were invalid."""
    assert prometheus.value(f'sum(simmer_request_success_total{{job="{JOB}"}})') == 5
    by_code = prometheus.query(f'simmer_request_failure_total{{job="{JOB}"}}')
    assert {r["metric"]["code"]: float(r["value"][1]) for r in by_code} == {"invalid_request": 2}
    assert prometheus.value(f'simmer_request_generation_tokens_count{{job="{JOB}"}}') == 5
    assert prometheus.value(f'simmer_sessions_created_total{{job="{JOB}"}}') == 5


@pytest.mark.parametrize(
    ("panel", "expr"), dashboard_queries(), ids=[p for p, _ in dashboard_queries()]
)
def test_dashboard_query_returns_data(
    traffic: ServerProcess, prometheus: Prometheus, panel: str, expr: str
) -> None:
    result = prometheus.query(grafana_to_promql(expr))
    assert result, f"{panel}: no data for {grafana_to_promql(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert all(math.isfinite(v) for v in values), f"{panel}: {values}"


def test_dashboard_variables_list_the_live_job_and_instance(
    traffic: ServerProcess, prometheus: Prometheus
) -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name, expected in [("job", JOB), ("instance", f"127.0.0.1:{traffic.port}")]:
        query = variables[name]["query"]["query"]
        selector, label = query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        values = prometheus.api(f"label/{label}/values", **{"match[]": grafana_to_promql(selector)})
        assert values == [expected], f"${name}: {query}"


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_expression_parses_and_reads_live_series(
    traffic: ServerProcess, prometheus: Prometheus, rule: dict[str, Any]
) -> None:
    prometheus.query(rule["expr"])  # a parse error fails the API call
    live = set(prometheus.api("label/__name__/values"))
    assert referenced_metrics(rule["expr"]) - live == set()


def test_alert_rules_load_and_evaluate_cleanly(
    traffic: ServerProcess, prometheus: Prometheus
) -> None:
    groups = prometheus.api("rules", type="alert")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {rule["alert"] for rule in alert_rules()}

    def evaluated() -> bool:
        groups = prometheus.api("rules", type="alert")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return all(not rule["lastEvaluation"].startswith("0001") for rule in rules)

    prometheus.wait_for("every alert rule evaluated", evaluated)
    for group in prometheus.api("rules", type="alert")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


@pytest.mark.parametrize(
    "alert", ["SimmerDown", "SimmerNoSuccessfulRequests", "SimmerHighErrorRatio"]
)
def test_a_healthy_service_with_client_errors_trips_no_outage_alert(
    traffic: ServerProcess, prometheus: Prometheus, alert: str
) -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    assert prometheus.query(rule["expr"]) == []


@pytest.mark.parametrize("rule", adapter_rules(), ids=[r["name"]["as"] for r in adapter_rules()])
def test_adapter_rule_gives_a_value_per_instance(
    traffic: ServerProcess, prometheus: Prometheus, rule: dict[str, Any]
) -> None:
    result = prometheus.query(adapter_to_promql(rule))
    assert [r["metric"] for r in result] == [{"instance": f"127.0.0.1:{traffic.port}"}]
    assert math.isfinite(float(result[0]["value"][1]))


def test_live_exposition_passes_promtool_check_metrics(traffic: ServerProcess) -> None:
    exposition = httpx.get(f"{traffic.base_url}/metrics", timeout=10).text
    assert "simmer_request_failure_total{" in exposition  # labelled series are present
    result = subprocess.run(
        [require_binary("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_probe_and_metrics_routes_stay_out_of_request_metrics(traffic: ServerProcess) -> None:
    names = (
        "simmer_request_success_total",
        "simmer_request_failure_total",
        "simmer_e2e_request_latency_seconds_count",
    )
    before = {name: scraped_value(traffic, name) for name in names}
    for path in ("/healthz", "/readyz", "/metrics", "/nowhere"):
        for _ in range(3):
            httpx.get(f"{traffic.base_url}{path}", timeout=10)
    assert {name: scraped_value(traffic, name) for name in names} == before
