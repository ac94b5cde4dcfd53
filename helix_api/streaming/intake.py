"""Runners' events taken in: tokens into live replies (memory, then SQL in flushes), the rest into rows.

The hot path, a post of tokens for a task whose lease this process has cached, touches no SQL: the
tokens go into the task's `LiveReply`, local followers wake, and the bus carries them to other
processes. A transaction is needed only to flush a reply's text (at most every `flush_every` seconds
per task, renewing the lease in the same statement), for the first post of an attempt in this
process, for progress and log events (rows, stored in seq order after the text before them), and
when something does not add up (a gap in seqs, a lease that may have changed). A flush is fenced by
the lease and by the stored seq, so a cancel or a reap takes effect at the next flush at the latest.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from helix_api.accounts import usage
from helix_api.db import Database
from helix_api.errors import EventsGap, HelixError, LeaseLost, TaskCancelled, TaskNotFound
from helix_api.models import utcnow
from helix_api.ops import metrics
from helix_api.streaming import events
from helix_api.streaming.bus import NoBus, RedisBus, make_bus
from helix_api.streaming.live import Gap, LiveReplies, LiveReply
from helix_api.tasks import leases, transitions
from helix_api.tasks.leases import LeasePolicy
from helix_api.tasks.notifier import publish, session_topic

logger = logging.getLogger(__name__)

Post = tuple[int, str, list[dict[str, Any]]]


class Intake:
    """Takes runners' event posts for one app; one per process."""

    def __init__(self, database: Database, live: LiveReplies, policy: LeasePolicy, *,
                 bus: NoBus | RedisBus | None = None, flush_every: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.database, self.live, self.policy = database, live, policy
        self.bus = bus or NoBus()
        self.flush_every, self.clock = flush_every, clock
        self._for_update = database.dialect == "postgresql"
        # Without a bus, followers in other processes learn of a flush by NOTIFY (PostgreSQL) or by
        # re-checking (SQLite); with one, the bus has already carried the tokens.
        self._notify_flush = self._for_update and self.bus.url is None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], database: Database, policy: LeasePolicy) -> Intake:
        """The intake FLUSH_SECONDS and the bus settings describe, with a fresh set of live replies."""
        live = LiveReplies()
        bus = make_bus(settings["BUS_URL"], functools.partial(_mirror, database, live), settings["BUS_NAMESPACE"])
        return cls(database, live, policy, bus=bus, flush_every=settings["FLUSH_SECONDS"])

    def add(self, posts: list[Post]) -> list[dict[str, Any] | HelixError]:
        """Take each post (task id, lease token, events); one answer per post, in order.

        An answer is `{"stored", "last_seq", "durable_seq", "cancelled"}`, or the error that refused
        that task alone (LeaseLost, TaskCancelled, TaskNotFound, or EventsGap with `resend_from`).
        """
        now, tick = utcnow(), self.clock()
        answers: list[dict[str, Any] | HelixError | None] = [None] * len(posts)
        entries: list[LiveReply | None] = [None] * len(posts)
        counts = [0] * len(posts)
        slow: list[int] = []
        out: dict[int, list[dict[str, Any]]] = {}
        for i, (task_id, token, items) in enumerate(posts):
            entry = self.live.get(task_id)
            if (entry is None or entry.lease_token != token or entry.lease_expires_at is None
                    or entry.lease_expires_at <= now or any(e["kind"] != "token" for e in items)):
                slow.append(i)
                continue
            with entry.lock:
                try:
                    added = entry.take((e["seq"], e["text"]) for e in sorted(items, key=_seq))
                except Gap:
                    slow.append(i)  # perhaps another process stored them: SQL knows
                    continue
            entries[i], counts[i] = entry, len(added)
            _fan_out(entry, added, out)
        due = [i for i, e in enumerate(entries) if e is not None and e.flush_due(self.flush_every, tick)]
        if slow or due:
            with self.database.transaction() as conn:
                for i in slow:
                    task_id, token, items = posts[i]
                    try:
                        entries[i], counts[i] = self._take_slowly(conn, task_id, token, items, now, out)
                    except Gap as gap:
                        answers[i] = EventsGap(f"Task {task_id}: resend its events from seq {gap.resend_from}.",
                                               resend_from=gap.resend_from)
                    except (LeaseLost, TaskCancelled, TaskNotFound) as exc:
                        answers[i] = exc
                for i in due:
                    answers[i] = self._flush(conn, entries[i], posts[i][1], now)
        self._deliver(out)
        return [answer or {"stored": counts[i], "last_seq": entries[i].last_seq,
                           "durable_seq": entries[i].durable_seq, "cancelled": False}
                for i, answer in enumerate(answers)]

    def finish(self, conn: Connection, task: Any, result: dict[str, Any],
               last_events: list[dict[str, Any]]) -> str | None:
        """The reply's final output, the runner's last events stored; in `complete`'s transaction.

        A result's `text` is the reply; otherwise (an image, say) the text streamed so far stands:
        None when SQL already holds all of it, so `complete` reads nothing it need not.
        """
        entry = self.live.forget(task.id)
        if entry is not None and (entry.attempt != task.attempt or entry.lease_token != task.lease_token):
            entry = None
        if entry is not None and entry.first_token_at is not None:
            # Sampled where the first tokens arrived: a runner keeps its connection, so that is nearly always here.
            metrics.time_per_token(task.model_name, self.clock() - entry.first_token_at, usage.counts(result)[1])
        after = entry.last_seq if entry is not None else task.last_event_seq
        fresh = sorted((e for e in last_events if e["seq"] > after), key=_seq)
        others = [e for e in fresh if e["kind"] != "token"]
        if others:
            events.rows(conn, task, others)
        final = result.get("text")
        if isinstance(final, str):
            return final
        tail = "".join(e["text"] for e in fresh if e["kind"] == "token")
        if entry is not None:
            return entry.text + tail
        if not tail:
            return None
        stored = events.stored_text(conn, task.id)
        return (stored.output if stored else "") + tail

    # Internals.

    def _take_slowly(self, conn: Connection, task_id: int, token: str, items: list[dict[str, Any]],
                     now: datetime, out: dict[int, list[dict[str, Any]]]) -> tuple[LiveReply, int]:
        """Take a post with SQL at hand: the lease checked, the entry made or brought in line, rows stored."""
        task = leases.held(conn, task_id, token, now, for_update=self._for_update)
        entry = self.live.get(task_id)
        fresh_attempt = task.last_event_seq == 0  # SQL holds nothing of this attempt yet
        if entry is None or entry.attempt != task.attempt or entry.lease_token != token:
            stored = events.stored_text(conn, task_id)
            text = stored.output if stored else ""
            entry = self.live.put(LiveReply(task.id, task.session_id, task.interaction_id, task.attempt, text=text,
                                            durable_len=len(text), durable_seq=task.last_event_seq,
                                            last_seq=task.last_event_seq, lease_token=token))
        elif task.last_event_seq != entry.durable_seq:
            stored = events.stored_text(conn, task_id)
            with entry.lock:
                entry.agree(stored.output, task.last_event_seq)
        entry.lease_expires_at = task.lease_expires_at
        fresh = sorted((e for e in items if e["seq"] > entry.last_seq), key=_seq)
        if fresh and fresh[0]["seq"] != entry.last_seq + 1:
            raise Gap(entry.last_seq + 1)
        taken = 0
        # In seq order: a run of tokens goes into the reply; a run of other events is stored as rows
        # once the text before it is, so what SQL holds is always a prefix of what the runner sent.
        for is_token, run in itertools.groupby(fresh, key=lambda e: e["kind"] == "token"):
            batch = list(run)
            with entry.lock:
                if is_token:
                    _fan_out(entry, entry.take((e["seq"], e["text"]) for e in batch), out)
                else:
                    self._store(conn, entry, token, now)
                    events.rows(conn, task, batch)
                    entry.last_seq = batch[-1]["seq"]
                    entry.marks.append((entry.last_seq, len(entry.text)))
            taken += len(batch)
        with entry.lock:
            self._store(conn, entry, token, now)  # renews the lease too
        if fresh_attempt and entry.first_token_at is None and entry.text:
            # Only here, off the hot path: an attempt's first post always comes this way.
            entry.first_token_at = self.clock()
            metrics.first_token(task, now)
        return entry, taken

    def _flush(self, conn: Connection, entry: LiveReply, token: str, now: datetime) -> HelixError | None:
        """Store an entry's unstored tail; the error to answer with when its lease no longer holds."""
        with entry.lock:
            if self._store(conn, entry, token, now):
                return None
            try:
                leases.held(conn, entry.task_id, token, now, for_update=self._for_update)
            except (LeaseLost, TaskCancelled, TaskNotFound) as exc:
                self.live.forget(entry.task_id)
                logger.info("task %s: events refused at flush: %s", entry.task_id, exc.code)
                return exc
            stored = events.stored_text(conn, entry.task_id)
            entry.agree(stored.output, stored.last_event_seq)  # another process stored some meanwhile
            self._store(conn, entry, token, now)
            return None

    def _store(self, conn: Connection, entry: LiveReply, token: str, now: datetime) -> bool:
        """Flush `entry` (caller holds its lock): its tail and seq, and a renewed lease."""
        expires = now + timedelta(seconds=self.policy.ttl_seconds)
        if not transitions.advance(conn, task_id=entry.task_id, lease_token=token, now=now, expires=expires,
                                   after_seq=entry.durable_seq, last_seq=entry.last_seq):
            return False
        events.append_text(conn, entry.interaction_id, entry.pending)
        entry.stored(entry.last_seq, len(entry.text))
        entry.lease_expires_at = expires
        if self._notify_flush:
            publish(conn, session_topic(entry.session_id), 0)
        return True

    def _deliver(self, out: dict[int, list[dict[str, Any]]]) -> None:
        notifier = self.database.notifier
        for session_id, messages in out.items():
            notifier.notify_text(session_topic(session_id))
            self.bus.publish(session_id, messages)


def _mirror(database: Database, live: LiveReplies, message: dict[str, Any]) -> None:
    """Apply another process's tokens from the bus, and wake this process's followers of the session."""
    def stored(task_id: int, attempt: int) -> str | None:
        with database.connect() as conn:
            row = events.stored_text(conn, task_id)
        return row.output if row is not None and row.attempt == attempt else None

    if live.mirror(message, stored):
        database.notifier.notify_text(session_topic(message["session_id"]))


def _seq(event: dict[str, Any]) -> int:
    return event["seq"]


def _fan_out(entry: LiveReply, added: list[tuple[int, int, str]], out: dict[int, list[dict[str, Any]]]) -> None:
    """Queue one bus message for what a post added to a reply."""
    if added:
        out.setdefault(entry.session_id, []).append({
            "task_id": entry.task_id, "session_id": entry.session_id, "interaction_id": entry.interaction_id,
            "attempt": entry.attempt, "offset": added[0][1], "text": "".join(t for _, _, t in added)})
