"""The README's Operators section names what operators see: every metric, every alert, every URL."""

from __future__ import annotations

import re

from tests.deploy.deploy_assets import (
    OPERATOR_DOCS,
    adapter_rules,
    alert_rules,
    compose_service,
    dashboard,
    metric_families,
)


def documented_metric_rows() -> set[str]:
    """Metric names in the first column of the README's metric table."""
    return set(re.findall(r"^\| `(simmer_[a-z0-9_]+)", OPERATOR_DOCS.read_text(), re.MULTILINE))


def test_every_metric_has_a_line_in_the_metric_table() -> None:
    suffix = {"counter": "_total", "info": "_info"}
    exposed = {name + suffix.get(kind, "") for name, kind in metric_families().items()}
    assert documented_metric_rows() == exposed


def test_every_metric_name_the_docs_mention_exists() -> None:
    families = metric_families()
    adapter = {rule["name"]["as"] for rule in adapter_rules()}
    for name in set(re.findall(r"\bsimmer_[a-z0-9_]*[a-z0-9]\b", OPERATOR_DOCS.read_text())):
        base = re.sub(r"_(total|info|bucket|count|sum)$", "", name)
        assert base in families or name in families or name in adapter, name


def test_every_alert_is_explained() -> None:
    text = OPERATOR_DOCS.read_text()
    for rule in alert_rules():
        assert f"| `{rule['alert']}` |" in text, rule["alert"]


def test_urls_match_the_published_ports_and_dashboard_uid() -> None:
    text = OPERATOR_DOCS.read_text()
    for service, path in [
        ("simmer", ""),
        ("grafana", f"/d/{dashboard()['uid']}"),
        ("prometheus", ""),
    ]:
        (port,) = compose_service(service)["ports"]
        assert f"http://localhost:{port['published']}{path}" in text, service
