"""The service's state while it runs: built in the lifespan, read by the handlers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from service.engine.core import EngineCore
from service.engine.model import ModelSession
from service.errors import NotReady
from service.generation.service import GenerationService
from service.metrics import Metrics
from service.protocol import Limits
from service.sessions import SessionStore
from service.settings import Settings
from service.supervisor import Supervisor
from simmer.bundle import ModelBundle


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    limits: Limits
    bundle: ModelBundle | None = None
    model: ModelSession | None = None
    store: SessionStore | None = None
    engine: EngineCore | None = None
    generation: GenerationService | None = None
    supervisor: Supervisor | None = None
    state_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    ready: bool = False
    websockets: set[object] = field(default_factory=set)

    def engine_problem(self) -> str | None:
        """Why the engine cannot serve now (dead, or stalled past the deadline), or None."""
        engine = self.engine
        if engine is None:
            return None
        if not engine.worker_alive:
            return "the engine worker has died"
        stalled = engine.stalled_for()
        if stalled > self.settings.engine_stall_s:
            return f"the engine worker has made no step for {stalled:.0f} s with work waiting"
        return None

    def service(self) -> GenerationService:
        if self.generation is None or not self.ready:
            raise NotReady("the model is still loading")
        return self.generation
