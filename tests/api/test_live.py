"""Live replies: tokens in memory at fixed offsets, stored in flushes, agreed between processes."""

from __future__ import annotations

import pytest

from helix_api.errors import EventsGap
from helix_api.models import Task
from helix_api.streaming.intake import Intake
from helix_api.streaming.live import Gap, LiveReplies, LiveReply
from tests.conftest import claim


def _entry(**changes) -> LiveReply:
    return LiveReply(**{"task_id": 1, "session_id": 1, "interaction_id": 1, "attempt": 1, "text": "",
                        "durable_len": 0, "durable_seq": 0, "last_seq": 0, **changes})


def test_tokens_take_their_offsets_once_each_and_a_gap_is_refused():
    entry = _entry()
    assert entry.take([(1, "Hel"), (2, "lo")]) == [(1, 0, "Hel"), (2, 3, "lo")]
    assert entry.take([(2, "lo"), (3, "!")]) == [(3, 5, "!")]  # seq 2 again: a resend
    with pytest.raises(Gap) as gap:
        entry.take([(5, "?")])
    assert gap.value.resend_from == 4 and entry.text == "Hello!" and entry.pending == "Hello!"
    entry.stored(2, 5)
    assert entry.pending == "!" and entry.marks == [(3, 6)]


def test_agreeing_with_another_processs_flush_keeps_what_continues_it():
    entry = _entry()
    entry.take([(1, "a"), (2, "b"), (3, "c")])
    entry.agree("ab", 2)  # another process stored 1-2: this one's 3 continues it
    assert (entry.durable_seq, entry.durable_len, entry.last_seq, entry.pending) == (2, 2, 3, "c")
    entry.agree("abcde", 5)  # stored beyond what this one has: start again from SQL's
    assert (entry.text, entry.durable_seq, entry.last_seq, entry.pending) == ("abcde", 5, 5, "")


def test_a_mirror_appends_what_continues_it_and_rereads_sql_after_a_gap():
    live = LiveReplies()
    stored = {"text": "He"}
    message = {"task_id": 7, "session_id": 3, "interaction_id": 9, "attempt": 1}
    assert live.mirror({**message, "offset": 0, "text": "Hel"}, lambda *_: stored["text"]) is True
    assert live.text(7, 1) == "Hel" and live.text(7, 2) is None
    assert live.mirror({**message, "offset": 1, "text": "el"}, lambda *_: None) is False  # nothing new
    stored["text"] = "Hello wor"
    assert live.mirror({**message, "offset": 8, "text": "rld"}, lambda *_: stored["text"]) is True
    assert live.text(7, 1) == "Hello world"


def _post(client, runner, task_id, token, *events):
    body = {"lease_token": token, "events": [{"seq": s, "kind": "token", "text": t} for s, t in events]}
    return client.post(f"/api/v1/worker/task/{task_id}/events", headers=runner, json=body)


def test_a_first_post_beyond_what_is_stored_is_told_where_to_resend_from(client, runner, task_factory):
    task_factory()
    claimed = claim(client, runner).json
    task_id, token = claimed["task"]["id"], claimed["lease"]["token"]
    refused = _post(client, runner, task_id, token, (3, "c"))
    assert refused.status_code == 409 and refused.json["error"] == "events_gap"
    assert refused.json["resend_from"] == 1
    assert _post(client, runner, task_id, token, (1, "a"), (2, "b"), (3, "c")).json["last_seq"] == 3


def test_two_processes_taking_one_tasks_tokens_store_each_once(app, client, runner, task_factory, db):
    """Posts of one task that land on two API processes, each with its own memory, as under gunicorn."""
    task_factory()
    claimed = claim(client, runner).json
    task_id, token = claimed["task"]["id"], claimed["lease"]["token"]
    ours = app.extensions["helix"].scheduler.intake
    theirs = Intake(db, LiveReplies(), ours.policy, flush_every=0.0)
    ours.flush_every = 3600.0  # ours keeps its tail in memory; theirs stores at once

    def post(intake, *events):
        return intake.add([(task_id, token, [{"seq": s, "kind": "token", "text": t} for s, t in events])])[0]

    assert post(ours, (1, "a"))["durable_seq"] == 1  # a first post is stored at once
    assert post(ours, (2, "b"), (3, "c"))["durable_seq"] == 1  # ours holds 2-3 in memory
    gap = post(theirs, (4, "d"))
    assert isinstance(gap, EventsGap) and gap.to_dict()["resend_from"] == 2
    assert post(theirs, (2, "b"), (3, "c"), (4, "d"))["durable_seq"] == 4  # the runner resent
    ours.flush_every = 0.0
    answer = post(ours, (5, "e"))  # ours learns SQL is ahead: it stores only what follows
    assert answer["durable_seq"] == 5 and ours.live.get(task_id).text == "abcde"
    with db.orm_read() as s:
        task = s.get(Task, task_id)
        assert (task.interaction.output, task.last_event_seq) == ("abcde", 5)
