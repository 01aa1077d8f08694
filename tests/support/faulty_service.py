"""`python -m tests.support.faulty_service`: the real service, with engine faults on demand.

Only tests run it (tests/reliability/test_engine_faults.py). `SIMMER_TEST_FAULTS` names
a folder the engine worker looks into before each step; a file there is taken (removed)
and acted on once:
- `raise`: the step raises, as a failing onnxruntime call would;
- `kill`: the worker thread dies (a BaseException escapes every handler);
- `hang`: the step never returns, as a hung call would.

Everything else is `python -m service` as it ships.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import service.app
from service.__main__ import main
from service.scheduler import DecodeScheduler, Sequence, _StepResult

FAULTS = Path(os.environ["SIMMER_TEST_FAULTS"])


class WorkerKilled(BaseException):
    """Escapes the worker's `except Exception`, so the thread ends."""


def _take(name: str) -> bool:
    try:
        (FAULTS / name).unlink()
    except FileNotFoundError:
        return False
    return True


class FaultyScheduler(DecodeScheduler):
    def _step(self, batch: list[Sequence]) -> _StepResult:
        if _take("raise"):
            raise RuntimeError("injected engine fault")
        if _take("kill"):
            raise WorkerKilled("injected: the engine worker is killed")
        if _take("hang"):
            threading.Event().wait()
        return super()._step(batch)


if __name__ == "__main__":
    service.app.DecodeScheduler = FaultyScheduler  # type: ignore[attr-defined]  # the app builds its scheduler from this name
    sys.exit(main())
