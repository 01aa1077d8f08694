"""The output processor: step results become kept tokens, on the event loop."""

from __future__ import annotations

import asyncio

import numpy as np

from service.engine.output import Hooks, OutputProcessor
from service.engine.params import SamplingParams
from service.engine.request import Request, RequestStatus


def _request(number: int, max_new: int = 10) -> Request:
    zeros = np.zeros((1, 4), np.float32)
    request = Request([5], zeros, zeros.copy(), SamplingParams(), max_new)
    request.request_id = number
    return request


def test_a_stop_check_that_raises_fails_only_its_own_request() -> None:
    failures: list[None] = []

    async def main() -> tuple[Request, Request]:
        output = OutputProcessor(Hooks(on_failure=lambda: failures.append(None)))
        broken, fine = _request(1), _request(2)

        def explode(token: int) -> str | None:
            raise IndexError("no such word")

        broken.check = explode
        for request in (broken, fine):
            output.track(request)
        h = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
        output.apply([broken, fine], [7, 7], h, h, {}, 0.0)
        return broken, fine

    broken, fine = asyncio.run(main())
    assert broken.finish_reason == "error" and broken.status is RequestStatus.FINISHED
    assert fine.tokens == [7] and fine.status is RequestStatus.RUNNING
    assert failures == [None]


def test_a_finished_request_keeps_the_state_of_its_last_kept_token() -> None:
    async def main() -> Request:
        output = OutputProcessor()
        request = _request(1, max_new=2)
        output.track(request)
        first = np.full((1, 1, 4), 1.0, np.float32)
        second = np.full((1, 1, 4), 2.0, np.float32)
        output.apply([request], [7], first, first, {}, 0.0)
        output.apply([request], [8], second, second, {}, 0.0)
        output.apply([request], [9], first, first, {}, 0.0)  # stepped ahead: dropped
        return request

    request = asyncio.run(main())
    assert request.finish_reason == "length" and request.tokens == [7, 8]
    assert request.feed == [8]  # the last kept token is pending, not fed
    assert np.array_equal(request.h, np.full((1, 4), 2.0))


def test_a_runs_steps_are_applied_in_order_and_stop_where_the_request_ends() -> None:
    """One result with three steps: a stop string at the second keeps its state and
    drops the third."""

    async def main() -> Request:
        output = OutputProcessor()
        request = _request(1, max_new=10)
        request.check = lambda token: "stop" if token == 8 else None
        output.track(request)
        steps = [np.full((1, 1, 4), float(k), np.float32) for k in (1, 2, 3)]
        more = [([8], steps[1], steps[1]), ([9], steps[2], steps[2])]
        output.apply([request], [7], steps[0], steps[0], {}, 0.0, more)
        return request

    request = asyncio.run(main())
    assert request.finish_reason == "stop" and request.tokens == [7, 8]
    assert request.feed == [8]
    assert np.array_equal(request.h, np.full((1, 4), 2.0))
