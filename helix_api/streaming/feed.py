"""Following a session: its stored events (rows) and the live text of the reply being written, as SSE.

An event id is a cursor `N` or `N.K`: the follower has every row up to N and, of the reply being
written after row N, the text up to offset K. Tokens are not rows, so a resume is served from rows
after N, then the reply's text from offset K: from this process's memory where it has the reply
(live.LiveReplies), else from what SQL holds. The text of an attempt comes in order after the rows
before it; it is complete before the row that ends the attempt, and starts again at 0 after the row
that starts the next one (clients drop a partial reply on `queued`, as they always have).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select

from helix_api.db import Database
from helix_api.models import InteractionState, TaskEvent
from helix_api.streaming import events
from helix_api.streaming.bus import NoBus, RedisBus
from helix_api.streaming.live import LiveReplies
from helix_api.tasks import estimates
from helix_api.tasks.notifier import session_topic

_EVENTS = TaskEvent.__table__
# The last state row at or before a cursor: whether a reply was being written there, and whose.
_STATE_AT = (select(_EVENTS.c.task_id, _EVENTS.c.interaction_id, _EVENTS.c.attempt, _EVENTS.c.data)
             .where(_EVENTS.c.session_id == bindparam("p_session"), _EVENTS.c.seq <= bindparam("p_seq"),
                    _EVENTS.c.kind == "state")
             .order_by(_EVENTS.c.seq.desc()).limit(1))
_CURSOR = re.compile(r"([0-9]{1,18})(?:\.([0-9]{1,18}))?")


@dataclass(frozen=True)
class Cursor:
    """Where a follower is: every row up to `seq`, and `offset` characters of the reply written after it."""

    seq: int = 0
    offset: int = 0

    @classmethod
    def parse(cls, raw: str) -> Cursor:
        """`N` or `N.K`; ValueError otherwise."""
        match = _CURSOR.fullmatch(raw.strip())
        if match is None:
            raise ValueError(raw)
        return cls(int(match[1]), int(match[2] or 0))

    def __str__(self) -> str:
        return f"{self.seq}.{self.offset}" if self.offset else str(self.seq)


@dataclass(frozen=True)
class Event:
    """One event as followers get it: a stored row, or a piece of a reply's live text (`kind` token)."""

    id: Cursor
    kind: str
    task_id: int
    interaction_id: int
    attempt: int
    data: dict[str, Any]
    created_at: datetime | None = None  # a row's; live text has no moment of its own (it is a range)
    seq: int | None = None  # a row's own number; None for live text

    def to_json(self) -> dict[str, Any]:
        """The event as clients see it."""
        head: dict[str, Any] = {"seq": self.seq, "created_at": self.created_at.isoformat()} if self.seq else {}
        return {**head, "kind": self.kind, "task_id": self.task_id, "interaction_id": self.interaction_id,
                "attempt": self.attempt, **self.data}

    def to_sse(self) -> str:
        """One Server-Sent Event; its id is the cursor a client resumes from (Last-Event-ID).

        An `estimate` is no step of the stream: it carries no id, so a client's last id stays the event
        before it (SSE keeps the last id it saw) and ids only ever grow.
        """
        head = "" if self.kind == "estimate" else f"id: {self.id}\n"
        return f"{head}event: {self.kind}\ndata: {json.dumps(self.to_json())}\n\n"


@dataclass
class _Writing:
    """The reply whose text follows the rows read so far."""

    task_id: int
    interaction_id: int
    attempt: int


class Follower:
    """Reads one session's events for one client, remembering where it is."""

    def __init__(self, database: Database, live: LiveReplies, session_id: int, cursor: Cursor) -> None:
        self.database, self.live, self.session_id = database, live, session_id
        self.seq, self.offset = cursor.seq, cursor.offset
        self.writing: _Writing | None = None
        if self.seq:
            with database.connect() as conn:
                row = conn.execute(_STATE_AT, {"p_session": session_id, "p_seq": self.seq}).one_or_none()
            if row is not None and row.data.get("state") == InteractionState.RUNNING:
                self.writing = _Writing(row.task_id, row.interaction_id, row.attempt)
        if self.writing is None:
            self.offset = 0

    def rows(self) -> tuple[list[Event], bool]:
        """The next stored events (live text completed before a row that ends it); True if more wait."""
        with self.database.connect() as conn:
            batch = events.since(conn, self.session_id, self.seq)
        out: list[Event] = []
        for row in batch:
            if row.kind == "state":
                state = row.data.get("state")
                writing = self.writing
                if writing is not None and row.task_id == writing.task_id and state == InteractionState.COMPLETE:
                    out.extend(self._text(self._stored(writing)))  # the end of the text, before its end
                if state == InteractionState.RUNNING:
                    self.writing, self.offset = _Writing(row.task_id, row.interaction_id, row.attempt), 0
                elif writing is not None and row.task_id == writing.task_id:
                    self.writing, self.offset = None, 0
            self.seq = row.seq
            out.append(Event(Cursor(self.seq, self.offset), row.kind, row.task_id, row.interaction_id, row.attempt,
                             row.data, row.created_at, row.seq))
        return out, len(batch) == events.BATCH

    def text(self) -> list[Event]:
        """The live text of the reply being written, beyond what this follower has."""
        writing = self.writing
        if writing is None:
            return []
        text = self.live.text(writing.task_id, writing.attempt)
        return self._text(text if text is not None else self._stored(writing))

    def _stored(self, writing: _Writing) -> str | None:
        with self.database.connect() as conn:
            row = events.stored_text(conn, writing.task_id)
        return row.output if row is not None and row.attempt == writing.attempt else None

    def _text(self, text: str | None) -> list[Event]:
        writing = self.writing
        if writing is None or text is None or len(text) <= self.offset:
            return []
        start, self.offset = self.offset, len(text)
        return [Event(Cursor(self.seq, self.offset), "token", writing.task_id, writing.interaction_id,
                      writing.attempt, {"text": text[start:], "offset": start})]


class Outlook:
    """`estimate` events of a followed session's queued reply: one as following starts and after every
    `queued` row, then one every `every` seconds while it stays queued. Not rows: they carry the cursor
    of the last event sent, so a resume from one of them is a resume from that event."""

    def __init__(self, database: Database, session_id: int, *, grace: float,
                 every: float = estimates.ESTIMATE_EVERY_SECONDS) -> None:
        self.database, self.session_id, self.grace, self.every = database, session_id, grace, every
        self.waiting = True  # not known yet: the first look says
        self.due_at = 0.0

    def saw(self, batch: list[Event]) -> None:
        """Follow the reply's state rows: queued again means a fresh estimate now; any other, none."""
        for event in batch:
            if event.kind == "state":
                self.waiting = event.data.get("state") == InteractionState.QUEUED
                self.due_at = 0.0

    def events(self, cursor: Cursor) -> list[Event]:
        """An `estimate` event when one is due and the session has a queued task (a few indexed reads)."""
        now = time.monotonic()
        if not self.waiting or now < self.due_at:
            return []
        self.due_at = now + self.every
        with self.database.connect() as conn:
            found = estimates.of_session(conn, self.session_id, grace=self.grace)
        if found is None:
            self.waiting = False
            return []
        task, outlook = found
        return [Event(cursor, "estimate", task.id, task.interaction_id, task.attempt, outlook.to_json())]


def feed(database: Database, live: LiveReplies, session_id: int, cursor: Cursor, *, follow: bool,
         keepalive: float, recheck: float, bus: NoBus | RedisBus | None = None,
         text_every: float = 0.0, outlook: Outlook | None = None) -> Iterator[Event | None]:
    """A session's events after `cursor`, then (if `follow`) each as it comes; None after every
    `keepalive` seconds without one, so a caller can keep its connection from looking idle.

    Live text goes out at most every `text_every` seconds: a reply streaming faster than that costs
    one write per interval rather than one per runner post, and the first text after a pause goes
    out at once. With an `outlook`, a queued reply's `estimate` events come too while following.
    """
    bus = bus or NoBus()
    quiet_since = text_at = time.monotonic()
    with database.notifier.watch(session_topic(session_id)) as watch, bus.follow(session_id):
        follower = Follower(database, live, session_id, cursor)
        read_rows = True
        while True:
            more = False
            if read_rows:
                batch, more = follower.rows()
                yield from batch
                if batch:
                    quiet_since = time.monotonic()
                    if outlook is not None:
                        outlook.saw(batch)
            if more:
                continue
            text = follower.text()
            if text:
                quiet_since = text_at = time.monotonic()
                yield from text
            if not follow:
                return
            if outlook is not None and (ahead := outlook.events(Cursor(follower.seq, follower.offset))):
                quiet_since = time.monotonic()
                yield from ahead
            # Re-check on a timer too: events stored by another process on SQLite send no wake-up.
            watch.wait(recheck)
            read_rows = watch.rows
            if not read_rows and (pause := text_at + text_every - time.monotonic()) > 0:
                time.sleep(pause)  # only text grew: let a little more of it gather
            if time.monotonic() - quiet_since >= keepalive:
                quiet_since = time.monotonic()
                yield None


def stream(database: Database, live: LiveReplies, session_id: int, cursor: Cursor, *, follow: bool,
           keepalive: float, recheck: float, bus: NoBus | RedisBus | None = None,
           text_every: float = 0.0, grace: float | None = None) -> Iterator[str]:
    """Everything after `cursor`, then (if `follow`) live events as they come, as SSE; with `grace`
    (NO_RUNNER_GRACE_SECONDS) a queued reply's `estimate` events too."""
    yield "retry: 1000\n\n"
    outlook = Outlook(database, session_id, grace=grace) if grace is not None and follow else None
    for event in feed(database, live, session_id, cursor, follow=follow, keepalive=keepalive, recheck=recheck,
                      bus=bus, text_every=text_every, outlook=outlook):
        # A comment line when quiet: keeps proxies from closing an idle stream.
        yield ": keepalive\n\n" if event is None else event.to_sse()
