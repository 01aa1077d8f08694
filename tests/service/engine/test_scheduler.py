"""The scheduler alone: queues, slots and step plans, with no thread and no onnxruntime."""

from __future__ import annotations

import numpy as np

from service.engine.params import SamplingParams
from service.engine.request import Request
from service.engine.scheduler import Scheduler
from simmer.tokenizer import PAD_ID


def _request(number: int, feed: list[int], max_new: int = 10) -> Request:
    zeros = np.zeros((1, 4), np.float32)
    request = Request(feed, zeros, zeros.copy(), SamplingParams(), max_new)
    request.request_id = number
    return request


def test_requests_wait_for_free_slots_oldest_first_and_slots_are_reused() -> None:
    scheduler = Scheduler(max_batch=2)
    first, second, third = (_request(i, [5]) for i in (1, 2, 3))
    for request in (first, second, third):
        scheduler.add(request)
    admitted = scheduler.admit()
    assert [r for r, _ in admitted] == [first, second]
    assert scheduler.num_waiting == 1 and scheduler.free_slots == 0
    slot_of_first = admitted[0][1]
    scheduler.cancel(first)
    assert scheduler.admit() == [(third, slot_of_first)]


def test_a_plan_feeds_every_running_request_and_says_when_the_batch_changed() -> None:
    scheduler = Scheduler(max_batch=4)
    long, short = _request(1, [5, 6, 7]), _request(2, [8])
    scheduler.add(long)
    scheduler.add(short)
    scheduler.admit()
    plan = scheduler.plan()
    assert plan is not None
    assert plan.requests == [long, short] and plan.prefill == [0, 1] and plan.changed
    scheduler.update(plan, [9, 9])
    again = scheduler.plan()
    assert again is not None
    assert again.prefill == [] and not again.changed  # same rows: the runner carries state
    assert list(again.slots) == list(plan.slots)


def test_update_retires_at_the_stop_token_and_at_the_token_limit() -> None:
    scheduler = Scheduler(max_batch=4)
    stops, limited, goes_on = _request(1, [5]), _request(2, [5], max_new=1), _request(3, [5])
    for request in (stops, limited, goes_on):
        scheduler.add(request)
    scheduler.admit()
    plan = scheduler.plan()
    assert plan is not None
    scheduler.update(plan, [PAD_ID, 7, 7])
    after = scheduler.plan()
    assert after is not None
    assert after.requests == [goes_on] and after.changed
    assert scheduler.free_slots == 3


def test_cancel_refuse_and_clear_free_slots_and_nothing_runs_after() -> None:
    scheduler = Scheduler(max_batch=3)
    waiting = _request(9, [5])
    running = [_request(i, [5]) for i in (1, 2, 3)]
    for request in (*running, waiting):
        scheduler.add(request)
    scheduler.admit()
    scheduler.cancel(waiting)  # still waiting: just forgotten
    assert scheduler.num_waiting == 0
    scheduler.refuse(running[0])  # its slot could not be loaded
    assert scheduler.free_slots == 1
    assert scheduler.clear() == running[1:]  # a failed step drops the rest
    assert scheduler.plan() is None and scheduler.free_slots == 3
    scheduler.cancel(running[1])  # cancelling one that is gone already is harmless
