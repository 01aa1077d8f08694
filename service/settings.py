"""The service's settings: the one place its defaults live.

Every field reads from an environment variable named `SIMMER_<FIELD>`, for example
`SIMMER_BUNDLE=models/default SIMMER_PORT=8000 python -m service`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """simmer's serving settings."""

    model_config = SettingsConfigDict(env_prefix="SIMMER_", extra="ignore")

    bundle: Path = Field(Path("models/default"), description="Model bundle folder to serve.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level for the service and the ASGI server."
    )
    access_log: bool = Field(
        False,
        description="Log a line for every HTTP request and every WebSocket connection "
        "accepted, at info (so not below SIMMER_LOG_LEVEL=info). Off, a busy server writes "
        "no log line per client.",
    )

    # sessions
    store: Literal["memory", "redis"] = Field(
        "memory", description="Session store backend: in-process memory or Redis."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL for the redis session store."
    )
    redis_cluster: bool = Field(
        False,
        description="Treat redis_url as a seed node of a Redis Cluster (the cluster client "
        "finds the other nodes); each session's keys share one slot.",
    )
    redis_prefix: str = Field(
        "simmer", description="Key prefix for everything simmer keeps in Redis."
    )
    session_ttl_s: float = Field(
        3600.0,
        gt=0,
        le=60 * 60 * 24 * 30,
        description="Idle time after which a session expires (seconds; minutes to days).",
    )
    session_lock_ttl_s: float = Field(
        2.0,
        gt=0,
        description="Redis store: a generation's session lock lapses this long after its "
        "server last renewed it, so a crashed replica frees its sessions within this time "
        "(seconds). A server stops a generation whose lock it cannot renew in time, and never "
        "saves a call whose lock was lost.",
    )
    session_lock_refresh_s: float = Field(
        0.5,
        gt=0,
        description="Redis store: how often a server renews the locks of its running "
        "generations (seconds); at most a third of session_lock_ttl_s.",
    )
    max_sessions: int = Field(
        100_000,
        ge=1,
        description="Memory store cap; the least recently used session is evicted past it.",
    )

    # engine and scheduler
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime execution providers, in order of preference (comma-separated).",
    )
    intra_op_threads: int = Field(
        1,
        ge=0,
        description="onnxruntime intra-op threads; 0 lets onnxruntime choose. 1 (the engine on "
        "one core, the event loop on another) costs the least CPU per token.",
    )
    max_batch: int = Field(256, ge=1, description="Most sessions stepped in one engine call.")
    engine_stall_s: float = Field(
        30.0,
        gt=0,
        description="Readiness and liveness fail when work has waited this long on an engine "
        "worker that made no step (a hung or dead worker), so an orchestrator restarts the pod.",
    )
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt accepted, in tokens.")
    max_new_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_logprobs: int = Field(
        20, ge=0, description="Largest logprobs (top-k words per step) allowed."
    )
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none.")
    ban_unk: bool = Field(
        True,
        description="Never generate [UNK] (id 1): it stands for any word outside the vocabulary "
        "and reads as a hole in the text. A request un-bans it by giving [UNK] a logit_bias "
        'of its own ({"1": 0} on every route, {"[UNK]": 0} on /v1/generate).',
    )

    # admission and limits
    max_waiting: int = Field(
        1024,
        ge=0,
        description="Generations that may wait for an engine slot (max_batch run at once); "
        "past that, requests get 503 with Retry-After.",
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest HTTP request body accepted."
    )
    max_ws_message_bytes: int = Field(
        65_536, ge=1024, description="Largest WebSocket message accepted from a client."
    )

    # security
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="API keys (comma-separated). When any key is set, every /v1/* route needs "
        "'Authorization: Bearer <key>' (WebSocket: also ?api_key=<key>).",
    )
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line (a mounted secret), added to api_keys."
    )
    metrics_require_key: bool = Field(
        False, description="Require an API key for /metrics too (probes always stay open)."
    )
    rate_limit_per_s: float = Field(
        0.0,
        ge=0,
        description="Requests per second allowed per API key (or client address); 0 is off.",
    )
    rate_limit_burst: int = Field(
        20, ge=1, description="Requests a key may make at once before limiting."
    )
    state_max_age_s: float = Field(
        86_400.0,
        gt=0,
        description="Signed state tokens older than this are refused (400).",
    )
    session_history: int = Field(
        8,
        ge=0,
        le=64,
        description="Call starts each session keeps for POST /v1/sessions/{id}/rewind; each "
        "adds the size of the LSTM state to the session (about 1 KiB for the book model).",
    )
    state_secret: str | None = Field(
        None,
        repr=False,
        description="Secret for signing exported session state; set the same on every replica. "
        "Unset: a random secret per process.",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long running generations may take to finish."
    )

    # observability
    metrics_enabled: bool = Field(True, description="Record Prometheus metrics and serve /metrics.")

    # streaming under load
    max_coalesce_steps: int = Field(
        16,
        ge=1,
        description="Under load, send each stream its tokens every few engine steps, at most "
        "this many, so one message carries several tokens; 1 sends every token as it comes.",
    )
    decode_runs: bool = Field(
        True,
        description="Let a small batch take several decode steps in one onnxruntime call "
        "(the bundle's decode_run graph): its tokens then arrive a few at a time, at a "
        "lower cost per token. False takes one step per call.",
    )

    @field_validator("providers", "api_keys", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("session_lock_refresh_s")
    @classmethod
    def _refresh_within_lock_ttl(cls, value: float, info: ValidationInfo) -> float:
        ttl_s = info.data.get("session_lock_ttl_s")
        if ttl_s is not None and 3 * value > ttl_s:
            raise ValueError(
                f"session_lock_refresh_s ({value:g} s) must be at most a third of "
                f"session_lock_ttl_s ({ttl_s:g} s), so a lock is renewed several times "
                "before it can lapse"
            )
        return value

    def all_api_keys(self) -> list[str]:
        """api_keys plus the keys in api_keys_file (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
