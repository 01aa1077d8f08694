"""Metrics for one generation, recorded at its event boundaries."""

from __future__ import annotations

import time

from service.metrics import Metrics


class GenerationObserver:
    def __init__(self, metrics: Metrics, arrived: float) -> None:
        self.metrics = metrics
        self.arrived = arrived  # perf_counter() when the request arrived
        self._last_token_at: float | None = None

    def tokens(self, count: int) -> None:
        """A token event carrying `count` new tokens goes out now."""
        now = time.perf_counter()
        if self._last_token_at is None:
            self.metrics.time_to_first_token.observe(now - self.arrived)
        else:
            # one observation per token, so bunched tokens weigh what they cost
            gap = max(1, count)
            self.metrics.inter_token_latency.observe_many((now - self._last_token_at) / gap, gap)
        self._last_token_at = now

    def finished(self, prompt_tokens: int, generated: int) -> None:
        """The call's session is saved: it generated `generated` tokens."""
        m = self.metrics
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(generated)
        m.request_prompt_tokens.observe(prompt_tokens)
        m.request_generation_tokens.observe(generated)
        m.e2e_latency.observe(time.perf_counter() - self.arrived)

    def outcome(self, finish_reason: str, client_gone: bool) -> None:
        if client_gone:
            self.metrics.failure("client_disconnected")
        else:
            self.metrics.request_success.labels(finish_reason=finish_reason).inc()
