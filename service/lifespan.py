"""What the app opens when it starts and closes when it stops.

`serving(runtime, bundle)` is the app's lifespan: it loads the bundle, opens the model
and the sampling graphs in onnxruntime, builds the engine core, opens the session store
and the generation service, warms the model up, starts the supervised background tasks
and only then reports ready. Everything closes again in its `finally`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from service.engine.core import EngineCore, build_engine
from service.engine.model import ModelSession
from service.engine.output import Hooks, StepStats
from service.engine.scoring import Scorer
from service.generation.service import GenerationService
from service.generation.sessions import ModelShape, StateTokens
from service.metrics import Metrics
from service.sessions import SessionStore, create_store, refresh_locks_forever, sweep_forever
from service.settings import Settings
from service.state import ServiceState
from service.supervisor import Supervisor
from simmer.bundle import ModelBundle, load_bundle

logger = logging.getLogger("simmer")


def engine_for(model: ModelSession, settings: Settings, metrics: Metrics) -> EngineCore:
    """The engine core over `model`, reporting to `metrics`."""

    def on_step(stats: StepStats) -> None:
        metrics.batch_size.observe(stats.batch_size)
        metrics.engine_step.observe(stats.seconds)

    hooks = Hooks(on_step, metrics.queue_time.observe, metrics.engine_failures.inc)
    return build_engine(
        model,
        settings.max_batch,
        hooks,
        settings.max_coalesce_steps,
        decode_runs=settings.decode_runs,
    )


def open_store(settings: Settings, metrics: Metrics) -> SessionStore:
    return create_store(
        settings.store,
        ttl_s=settings.session_ttl_s,
        max_sessions=settings.max_sessions,
        redis_url=settings.redis_url,
        prefix=settings.redis_prefix,
        on_evict=metrics.on_evict,
        lock_ttl_s=settings.session_lock_ttl_s,
        redis_cluster=settings.redis_cluster,
    )


def start_background(
    supervisor: Supervisor,
    settings: Settings,
    store: SessionStore,
    engine: EngineCore,
    generation: GenerationService,
) -> None:
    supervisor.start(
        "session_sweeper",
        functools.partial(sweep_forever, store, min(60.0, settings.session_ttl_s / 4)),
    )
    supervisor.start(
        "engine_watchdog",
        functools.partial(engine.watch_worker, min(1.0, settings.engine_stall_s / 4)),
    )
    supervisor.start(
        "lock_refresher",
        functools.partial(
            refresh_locks_forever,
            store,
            generation.held_sessions,
            generation.cancel,
            settings.session_lock_ttl_s,
            settings.session_lock_refresh_s,
        ),
    )


async def _open_bundle(given: ModelBundle | None, path: Path) -> ModelBundle:
    return given if given is not None else await asyncio.to_thread(load_bundle, path)


@asynccontextmanager
async def serving(runtime: ServiceState, bundle: ModelBundle | None) -> AsyncIterator[None]:
    settings, metrics = runtime.settings, runtime.metrics
    supervisor = runtime.supervisor = Supervisor(
        on_failure=lambda name: metrics.task_failures.labels(name).inc()
    )
    loaded = runtime.bundle = await _open_bundle(bundle, settings.bundle)
    runtime.limits = replace(runtime.limits, tokenizer=loaded.tokenizer)  # for logit_bias
    model = runtime.model = await asyncio.to_thread(
        ModelSession, loaded, settings.providers, settings.intra_op_threads
    )
    # echo's scorer: a session of its own on one core, never on the decode path
    scorer = await asyncio.to_thread(Scorer.from_bundle, loaded, 1, settings.providers)
    engine = runtime.engine = engine_for(model, settings, metrics)
    store = runtime.store = open_store(settings, metrics)
    generation = runtime.generation = GenerationService(
        engine,
        store,
        loaded.tokenizer,
        metrics,
        model=ModelShape(loaded.version, model.num_layers, model.hidden_size),
        max_prompt_tokens=settings.max_prompt_tokens,
        session_ttl_s=settings.session_ttl_s,
        max_waiting=settings.max_waiting,
        session_history=settings.session_history,
        state_tokens=StateTokens(runtime.state_secret, settings.state_max_age_s),
        scorer=scorer,
    )
    metrics.model_info.info(
        {
            "name": loaded.name,
            "version": loaded.version,
            "bundle_sha256": loaded.model_hash,
            "provider": model.provider,
        }
    )
    try:
        engine.start()
        # the largest batch too, so memory reaches its working size before traffic
        await asyncio.to_thread(model.warm_up, (1, 8, settings.max_batch))
        start_background(supervisor, settings, store, engine, generation)
        runtime.ready = True
        logger.info(
            "serving %s %s on %s with the %s store",
            loaded.name,
            loaded.version,
            model.provider,
            settings.store,
        )
        yield
    finally:
        runtime.ready = False
        await supervisor.close()
        await engine.close()
        await generation.wait_finishers(timeout_s=5.0)  # their saves, before the store closes
        await store.close()
