"""Every Prometheus object the service records, with fixed label names.

Names follow vLLM's where one exists, with the prefix `simmer_`. Label values are
bounded (finish reasons, error codes, eviction reasons): never session ids or keys.
Each app owns a registry, so several apps can live in one process (tests do).
"""

from __future__ import annotations

import bisect
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# The engine steps in tens of microseconds to tens of milliseconds.
FAST_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# Queue time and TTFT on an idle server are sub-millisecond too; loaded, up to a minute.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

FINISH_REASONS = ("length", "stop", "eos", "cancelled", "shutdown")
EVICTION_REASONS = ("idle", "capacity", "explicit")
RESUME_SOURCES = ("memory", "redis", "state")  # where a continued session's state came from
# the service's supervised background tasks (see service/supervisor.py)
BACKGROUND_TASKS = ("session_sweeper", "lock_refresher", "engine_watchdog")


class TokenHistogram(Histogram):
    """A histogram that can record one value `count` times at the cost of one.

    A message that carries several coalesced tokens counts as that many inter-token
    gaps; observing them one by one cost a few microseconds per token, which at 256
    streams is most of what metrics cost.
    """

    def observe_many(self, amount: float, count: int) -> None:
        """The same as `observe(amount)` `count` times."""
        if count <= 0:
            return
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        self._sum.inc(amount * count)
        if amount <= math.inf:  # as observe(): a NaN lands in no bucket
            self._buckets[bisect.bisect_left(self._upper_bounds, amount)].inc(count)


class _Noop:
    """Stands in for every metric when metrics are off, so recording costs nothing."""

    def labels(self, *args: object, **kwargs: object) -> _Noop:
        return self

    def inc(self, amount: float = 1) -> None:
        return None

    def dec(self, amount: float = 1) -> None:
        return None

    def set(self, value: float) -> None:
        return None

    def observe(self, value: float) -> None:
        return None

    def observe_many(self, value: float, count: int) -> None:
        return None

    def info(self, value: dict[str, str]) -> None:
        return None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "simmer_time_to_first_token_seconds",
            "Time from request arrival to the first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = TokenHistogram(
            "simmer_inter_token_latency_seconds",
            "Time between successive tokens of a request.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "simmer_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "simmer_request_queue_time_seconds",
            "Time a request waited before its first engine step.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "simmer_request_prompt_tokens",
            "Prompt tokens per request.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "simmer_request_generation_tokens",
            "Generated tokens per request.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "simmer_batch_size",
            "Sessions stepped per engine step.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_step = Histogram(
            "simmer_engine_step_seconds",
            "Wall time of one engine step, sampling included (a decode run's steps each "
            "count its time over the steps kept).",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "simmer_prompt_tokens",
            "Prompt tokens fed to the engine.",
            registry=r,
        )
        self.generation_tokens = Counter(
            "simmer_generation_tokens",
            "Tokens generated.",
            registry=r,
        )
        self.request_success = Counter(
            "simmer_request_success",
            "Requests that finished, by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.request_failure = Counter(
            "simmer_request_failure",
            "Requests that failed, by error code.",
            ["code"],
            registry=r,
        )
        self.sessions_created = Counter(
            "simmer_sessions_created",
            "Sessions created.",
            registry=r,
        )
        self.session_resume = Counter(
            "simmer_session_resume",
            "Calls that continued a session, by where its state came from: this server's "
            "memory store, Redis, or a signed state token the client sent.",
            ["source"],
            registry=r,
        )
        self.sessions_evicted = Counter(
            "simmer_sessions_evicted",
            "Sessions removed, by reason.",
            ["reason"],
            registry=r,
        )
        self.requests_running = Gauge(
            "simmer_num_requests_running",
            "Generations in progress.",
            registry=r,
        )
        self.requests_waiting = Gauge(
            "simmer_num_requests_waiting",
            "Generations waiting for an engine slot.",
            registry=r,
        )
        self.sessions_active = Gauge(
            "simmer_sessions_active",
            "Sessions held by the session store (with Redis every replica reports the shared "
            "store: aggregate with max, not sum).",
            registry=r,
        )
        self.websocket_connections = Gauge(
            "simmer_websocket_connections",
            "Open WebSocket connections.",
            registry=r,
        )
        self.engine_failures = Counter(
            "simmer_engine_failures",
            "Engine worker faults: each failed the generations of one step, then the worker "
            "went on.",
            registry=r,
        )
        self.task_failures = Counter(
            "simmer_task_failures",
            "Background task faults (restarted after each), by task.",
            ["task"],
            registry=r,
        )
        self.model_info = Info("simmer_model", "The model being served.", registry=r)
        for reason in FINISH_REASONS:
            self.request_success.labels(finish_reason=reason)
        for reason in EVICTION_REASONS:
            self.sessions_evicted.labels(reason=reason)
        for task in BACKGROUND_TASKS:
            self.task_failures.labels(task=task)
        for source in RESUME_SOURCES:
            self.session_resume.labels(source=source)
        if not enabled:
            for name, value in list(vars(self).items()):
                if isinstance(value, Counter | Gauge | Histogram | Info):
                    setattr(self, name, _Noop())

    def failure(self, code: str) -> None:
        """Count one request answered with the error `code`."""
        self.request_failure.labels(code=code).inc()

    def on_evict(self, reason: str, count: int) -> None:
        self.sessions_evicted.labels(reason=reason).inc(count)
