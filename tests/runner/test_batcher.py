"""Event posts of several tasks: those that meet while one is in flight share the next request."""

from __future__ import annotations

import threading

import pytest

from runner.batcher import EventBatcher
from runner.errors import ApiError, ApiUnavailable, LeaseLost, TaskCancelled


class SlowClient:
    """Answers every post as stored; the first request waits until released."""

    def __init__(self) -> None:
        self.requests: list[list[dict]] = []
        self.first_in_flight = threading.Event()
        self.release = threading.Event()
        self.answers: dict[int, dict] = {}

    def post_events_many(self, posts):
        self.requests.append(posts)
        if len(self.requests) == 1:
            self.first_in_flight.set()
            assert self.release.wait(5)
        return [self.answers.get(p["task_id"], {"task_id": p["task_id"], "stored": len(p["events"]),
                                                 "last_seq": p["events"][-1]["seq"], "cancelled": False})
                for p in posts]


def _events(seq: int) -> list[dict]:
    return [{"seq": seq, "kind": "token", "text": "x"}]


def test_posts_that_meet_an_inflight_one_go_out_together():
    client = SlowClient()
    batcher = EventBatcher(client)
    answers: dict[int, dict] = {}
    first = threading.Thread(target=lambda: answers.update({1: batcher.post(1, "l_1", _events(1))}))
    first.start()
    assert client.first_in_flight.wait(5)
    others = [threading.Thread(target=lambda n=n: answers.update({n: batcher.post(n, f"l_{n}", _events(n))}))
              for n in (2, 3, 4)]
    for thread in others:
        thread.start()
    while len(batcher._queue) < 3:  # all three waiting behind the first request
        threading.Event().wait(0.01)
    client.release.set()
    for thread in [first, *others]:
        thread.join(5)
    assert [[p["task_id"] for p in posts] for posts in client.requests] == [[1], [2, 3, 4]]
    assert {n: a["last_seq"] for n, a in answers.items()} == {1: 1, 2: 2, 3: 3, 4: 4}
    assert client.requests[1][0]["lease_token"] == "l_2"


def test_each_task_gets_its_own_refusal():
    client = SlowClient()
    client.release.set()
    client.answers = {7: {"task_id": 7, "error": "lease_lost", "message": "stale"},
                      8: {"task_id": 8, "error": "task_cancelled", "message": "cancelled"}}
    batcher = EventBatcher(client)
    with pytest.raises(LeaseLost):
        batcher.post(7, "l_7", _events(1))
    with pytest.raises(TaskCancelled):
        batcher.post(8, "l_8", _events(1))
    assert batcher.post(9, "l_9", _events(4))["last_seq"] == 4


def test_a_refusal_is_told_by_its_code_not_an_invented_status():
    client = SlowClient()
    client.release.set()
    client.answers = {5: {"task_id": 5, "error": "not_found", "message": "no task 5"}}
    with pytest.raises(ApiError) as caught:
        EventBatcher(client).post(5, "l_5", _events(1))
    assert type(caught.value) is ApiError
    assert caught.value.code == "not_found" and caught.value.status is None
    assert str(caught.value) == "not_found: no task 5"


def test_a_failed_request_fails_every_post_in_it():
    class Down:
        def post_events_many(self, posts):
            raise ApiUnavailable("503")

    with pytest.raises(ApiUnavailable):
        EventBatcher(Down()).post(1, "l_1", _events(1))
