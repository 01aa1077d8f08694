"""TokenHistogram.observe_many records exactly what as many observe calls would."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import FAST_BUCKETS, Metrics, TokenHistogram

# below every bound, on a bound, between bounds, on the last finite bound, above them all
VALUES = [0.0, 0.00005, 0.0001, 0.0003, 0.001, 1.0, 7.5]


def _pair() -> tuple[CollectorRegistry, TokenHistogram, CollectorRegistry, TokenHistogram]:
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    a = TokenHistogram("gap_seconds", "gaps", buckets=FAST_BUCKETS, registry=one_by_one)
    b = TokenHistogram("gap_seconds", "gaps", buckets=FAST_BUCKETS, registry=at_once)
    return one_by_one, a, at_once, b


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    out = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            out[(sample.name, sample.labels.get("le", ""))] = sample.value
    return out


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("count", [1, 3, 16])
def test_observe_many_equals_repeated_observe(value: float, count: int) -> None:
    one_by_one, a, at_once, b = _pair()
    for _ in range(count):
        a.observe(value)
    b.observe_many(value, count)
    expected, got = _samples(one_by_one), _samples(at_once)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert math.isclose(got[key], want, rel_tol=1e-12, abs_tol=1e-15), key
    assert got[("gap_seconds_count", "")] == count


def test_observe_many_of_nothing_records_nothing() -> None:
    one_by_one, _, at_once, b = _pair()
    b.observe_many(0.5, 0)
    assert _samples(at_once) == _samples(one_by_one)


def test_the_service_records_inter_token_gaps_with_it() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.inter_token_latency.observe_many(0.002, 4)
    text = generate_latest(metrics.registry).decode()
    assert 'simmer_inter_token_latency_seconds_bucket{le="0.001"} 0.0' in text
    assert 'simmer_inter_token_latency_seconds_bucket{le="0.0025"} 4.0' in text
    assert "simmer_inter_token_latency_seconds_count 4.0" in text
    # and with metrics off it is a no-op like every other metric
    Metrics(CollectorRegistry(), enabled=False).inter_token_latency.observe_many(0.002, 4)
