"""service/metrics.py against issue 6's list: every metric with its type, the simmer_
prefix, fixed and bounded label names, and buckets fine enough for the engine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.metrics import Metrics

# Issue 6, as exposed: counters carry `_total` on the wire, the info metric `_info`.
SPEC = {
    "simmer_time_to_first_token_seconds": "histogram",
    "simmer_inter_token_latency_seconds": "histogram",
    "simmer_e2e_request_latency_seconds": "histogram",
    "simmer_request_queue_time_seconds": "histogram",
    "simmer_request_prompt_tokens": "histogram",
    "simmer_request_generation_tokens": "histogram",
    "simmer_batch_size": "histogram",
    "simmer_engine_step_seconds": "histogram",
    "simmer_prompt_tokens_total": "counter",
    "simmer_generation_tokens_total": "counter",
    "simmer_request_success_total": "counter",
    "simmer_request_failure_total": "counter",
    "simmer_sessions_created_total": "counter",
    "simmer_sessions_evicted_total": "counter",
    "simmer_session_resume_total": "counter",
    "simmer_num_requests_running": "gauge",
    "simmer_num_requests_waiting": "gauge",
    "simmer_sessions_active": "gauge",
    "simmer_websocket_connections": "gauge",
    "simmer_model_info": "info",
    # issue 13: the supervised engine and background tasks
    "simmer_engine_failures_total": "counter",
    "simmer_task_failures_total": "counter",
}
LABELS = {
    "simmer_request_success_total": {"finish_reason"},
    "simmer_request_failure_total": {"code"},
    "simmer_sessions_evicted_total": {"reason"},
    "simmer_session_resume_total": {"source"},
    "simmer_task_failures_total": {"task"},
    "simmer_model_info": {"name", "version", "bundle_sha256", "provider"},
}


def exposed() -> dict[str, str]:
    """Exposed name -> type for a fresh registry (counters with `_total`, info with `_info`)."""
    suffix = {"counter": "_total", "info": "_info"}
    return {
        family.name + suffix.get(family.type, ""): family.type
        for family in Metrics().registry.collect()
    }


def test_every_metric_of_the_issue_is_declared_with_its_type() -> None:
    assert {name: kind for name, kind in exposed().items() if name in SPEC} == SPEC


def test_every_metric_is_prefixed_simmer() -> None:
    assert [name for name in exposed() if not name.startswith("simmer_")] == []


def test_label_names_are_fixed_and_bounded() -> None:
    metrics = Metrics()
    metrics.model_info.info({"name": "m", "version": "v", "bundle_sha256": "h", "provider": "cpu"})
    metrics.request_failure.labels(code="invalid_request").inc()
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            names = set(sample.labels) - {"le"}
            if names:
                labels.setdefault(sample.name, set()).update(names)
    assert labels == LABELS


def test_latency_histograms_resolve_sub_millisecond_times() -> None:
    """The tiny engine steps, queues and streams in well under a millisecond."""
    for family in Metrics().registry.collect():
        if family.type == "histogram" and family.name.endswith("_seconds"):
            bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
            assert min(bounds) <= 0.0001, f"{family.name}: first bucket {min(bounds)}"
            assert max(b for b in bounds if b != float("inf")) >= 1.0, family.name


def test_labelled_counters_start_at_zero_for_every_known_value() -> None:
    """Pre-created children keep rate() and alert ratios defined before the first event."""
    registry = CollectorRegistry()
    Metrics(registry)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }
    for reason in ("length", "stop", "eos", "cancelled", "shutdown"):
        assert samples[("simmer_request_success_total", (("finish_reason", reason),))] == 0
    for reason in ("idle", "capacity", "explicit"):
        assert samples[("simmer_sessions_evicted_total", (("reason", reason),))] == 0
    for task in ("session_sweeper", "lock_refresher", "engine_watchdog"):
        assert samples[("simmer_task_failures_total", (("task", task),))] == 0
