"""The report callback: numbered events, posted in batches, resent with the same seq after a failure."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from runner.errors import ApiUnavailable, EventsGap, LeaseLost, StopReason, TaskCancelled
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


def test_events_the_api_lost_before_storing_are_resent_on_events_gap():
    # The API answers with what it has stored (durable_seq); it restarts and asks for the rest again.
    replies = iter([{"cancelled": False, "durable_seq": 1}, {"cancelled": False, "durable_seq": 1}])

    def post(events: list[dict[str, Any]]) -> dict[str, Any]:
        attempts.append([e["seq"] for e in events])
        if len(attempts) == 3:
            raise EventsGap(409, "events_gap", "resend from seq 2")
        return next(replies, {"cancelled": False, "durable_seq": events[-1]["seq"]})

    attempts: list[list[int]] = []
    report = Report(42, post, batch_size=1)
    for text in ("a", "b", "c", "d"):
        report.token(text)
        report.flush()
    # seq 2 and 3 were taken but not stored when the API went away: they go again, before 4.
    assert attempts == [[1], [2], [3], [2], [3], [4]]
    assert report.close() is True


def test_the_tail_sent_with_the_result_carries_what_the_api_has_not_stored():
    report = Report(42, lambda events: {"cancelled": False, "durable_seq": 1}, batch_size=2)
    for text in ("a", "b", "c"):
        report.token(text)
    assert report.flush() is True  # posted 1-2 then 3; the API stored only 1
    report.token("d")
    assert [e["seq"] for e in report.close_for_result(carry=8)] == [2, 3, 4]
