"""`python -m tests.support.faulty_service`: the real service, with engine faults on demand.

Only tests run it (tests/reliability/test_engine_faults.py). `SIMMER_TEST_FAULTS` names
a folder the engine worker looks into before each step (and the stream before each
message); a file there is taken (removed) and acted on once:
- `raise`: the step raises, as a failing onnxruntime call would;
- `kill`: the worker thread dies (a BaseException escapes every handler);
- `hang`: the step never returns, as a hung call would;
- `stream`: the WebSocket stream's next message raises in the connection's own loop,
  outside any generation, as a bug there would.

Everything else is `python -m service` as it ships.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from service.__main__ import main
from service.engine.core import EngineCore
from service.engine.runner import StepOutput
from service.engine.scheduler import StepPlan
from service.errors import Rendered
from service.protocol import WSGenerate
from service.routes import ws

FAULTS = Path(os.environ["SIMMER_TEST_FAULTS"])
_step = EngineCore._step
_handle_text = ws._Connection.handle_text


class WorkerKilled(BaseException):
    """Escapes the worker's `except Exception`, so the thread ends."""


def _take(name: str) -> bool:
    try:
        (FAULTS / name).unlink()
    except FileNotFoundError:
        return False
    return True


def faulty_step(core: EngineCore, plan: StepPlan) -> list[StepOutput]:
    """The engine core's step (or run), after acting on a fault file if there is one."""
    if _take("raise"):
        raise RuntimeError("injected engine fault")
    if _take("kill"):
        raise WorkerKilled("injected: the engine worker is killed")
    if _take("hang"):
        threading.Event().wait()
    return _step(core, plan)


def faulty_handle_text(conn: ws._Connection, text: str) -> WSGenerate | Rendered | None:
    """The stream's parse of one message, after acting on a `stream` fault file."""
    if _take("stream"):
        raise RuntimeError("injected stream fault")
    return _handle_text(conn, text)


if __name__ == "__main__":
    EngineCore._step = faulty_step  # type: ignore[method-assign,assignment]  # the fault hook
    ws._Connection.handle_text = faulty_handle_text  # type: ignore[method-assign,assignment]
    sys.exit(main())
