"""The report callback: numbered events, posted in batches, resent with the same seq after a failure."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from runner.errors import ApiUnavailable, LeaseLost, StopReason, TaskCancelled
from runner.reporter import Report


class FakePost:
    """Records each batch; fails the calls listed in `failures` with the given exceptions."""

    def __init__(self, failures: dict[int, Exception] | None = None, reply: dict[str, Any] | None = None):
        self.attempts: list[list[dict[str, Any]]] = []
        self.failures = failures or {}
        self.reply = reply or {"cancelled": False}
        self.posted = threading.Event()

    def __call__(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        self.attempts.append([dict(event) for event in events])
        if len(self.attempts) in self.failures:
            raise self.failures[len(self.attempts)]
        self.posted.set()
        return self.reply


def test_events_numbered_from_one_and_posted_in_batches():
    post = FakePost()
    report = Report(42, post, batch_size=3)
    report.token("Hel")
    report.token("lo")
    report.progress(3, 10, "denoising", eta=2)
    report.log("loaded adapter", level="debug")
    report.token("!")
    assert report.close() is True
    events = [event for batch in post.attempts for event in batch]
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]
    assert events[2] == {"seq": 3, "kind": "progress", "step": 3, "total": 10, "message": "denoising",
                         "eta": 2}
    assert events[3] == {"seq": 4, "kind": "log", "level": "debug", "message": "loaded adapter"}
    assert all(len(batch) <= 3 for batch in post.attempts)


def test_background_flusher_posts_without_close():
    post = FakePost()
    report = Report(42, post, flush_interval=0.01)
    report.start()
    try:
        report.token("hi")
        assert post.posted.wait(5), "the flusher never posted"
        assert post.attempts[0] == [{"seq": 1, "kind": "token", "text": "hi"}]
    finally:
        report.close()


def test_failed_post_is_resent_with_the_same_seq_numbers():
    post = FakePost(failures={1: ApiUnavailable("down")})
    report = Report(42, post)
    report.token("a")
    report.token("b")
    assert report.flush() is False  # kept pending
    report.token("c")
    assert report.flush() is True
    assert [[e["seq"] for e in batch] for batch in post.attempts] == [[1, 2], [1, 2, 3]]


def test_cancel_makes_every_method_raise():
    report = Report(42, FakePost())
    report.token("a")
    report.cancel(StopReason.CANCELLED)
    assert report.cancelled
    for call in (lambda: report.token("b"), lambda: report.progress(1, 2), lambda: report.log("x"),
                 report.check):
        with pytest.raises(TaskCancelled) as caught:
            call()
        assert caught.value.reason == StopReason.CANCELLED
    assert report.last_seq == 1


def test_first_stop_reason_wins():
    report = Report(42, FakePost())
    report.cancel(StopReason.SHUTDOWN)
    report.cancel(StopReason.CANCELLED)
    assert report.stop_reason == StopReason.SHUTDOWN


def test_cancelled_in_events_reply_stops_the_backend():
    report = Report(42, FakePost(reply={"stored": 1, "last_seq": 1, "cancelled": True}))
    report.token("a")
    report.flush()
    with pytest.raises(TaskCancelled):
        report.token("b")


@pytest.mark.parametrize("error, reason", [(TaskCancelled(StopReason.CANCELLED), StopReason.CANCELLED),
                                           (LeaseLost(409, "lease_lost", "stale"), StopReason.LEASE_LOST)])
def test_refused_for_good_drops_pending_and_stops(error, reason):
    post = FakePost(failures={1: error})
    report = Report(42, post)
    report.token("a")
    assert report.flush() is False
    assert report.stop_reason == reason
    assert report.flush() is True and len(post.attempts) == 1  # nothing left to resend


def test_close_without_flush_drops_pending():
    post = FakePost()
    report = Report(42, post)
    report.token("a")
    report.close(flush=False)
    assert post.attempts == []
