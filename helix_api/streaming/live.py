"""Replies being written right now: their text in memory, so tokens cost no SQL row each.

A runner's token events are appended here and fanned out to followers from memory; the text reaches
SQL (the reply's `output`, and the task's `last_event_seq`) at most every `flush_every` seconds per
task, and at the end. Each token event has a fixed place in its reply: its text starts at the offset
where all earlier tokens of the attempt end, so any process that builds on a correct stored prefix
puts the same text at the same offsets. That is what lets a follower resume from an event id that
carries a text offset, in any process, and after an API restart (the runner resends what was not yet
stored: see notes.md, "durable_seq").

An entry is either a poster's (this process took the runner's tokens: it caches the lease and owns
the unflushed tail) or a mirror (fed by the bus from another process, for local followers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Entries nobody touched for this long are dropped: their task ended in another process, or the
# runner went away (its lease expires and the reaper requeues it).
IDLE_SECONDS = 120.0


class Gap(Exception):
    """Tokens arrived whose earlier seqs this process does not have: the runner must resend from `resend_from`."""

    def __init__(self, resend_from: int) -> None:
        super().__init__(resend_from)
        self.resend_from = resend_from


@dataclass
class LiveReply:
    """The text of one attempt at a reply, as far as this process knows it."""

    task_id: int
    session_id: int
    interaction_id: int
    attempt: int
    text: str  # the stored prefix, then what is not stored yet
    durable_len: int  # how much of `text` SQL holds
    durable_seq: int  # the last seq SQL holds (tasks.last_event_seq)
    last_seq: int  # the last seq in `text`
    lease_token: str | None = None  # None for a mirror
    lease_expires_at: datetime | None = None
    flushed_at: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)
    # (seq, end offset) of each token not stored yet, to agree with another process's flush.
    marks: list[tuple[int, int]] = field(default_factory=list)
    # When this process took the attempt's first token (monotonic), for the time per output token.
    first_token_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pending(self) -> str:
        """The text not stored yet."""
        return self.text[self.durable_len:]

    def take(self, tokens: Iterable[tuple[int, str]]) -> list[tuple[int, int, str]]:
        """Append tokens (seq, text) after `last_seq`, each once; the (seq, offset, text) appended.

        Raises Gap when the first new seq is not `last_seq + 1`: something in between is missing here.
        """
        added: list[tuple[int, int, str]] = []
        for seq, text in tokens:
            if seq <= self.last_seq:
                continue  # a resend of what this process has
            if seq != self.last_seq + 1:
                raise Gap(self.last_seq + 1)
            added.append((seq, len(self.text), text))
            self.text += text
            self.last_seq = seq
            self.marks.append((seq, len(self.text)))
        self.touched = time.monotonic()
        return added

    def stored(self, seq: int, length: int) -> None:
        """SQL now holds everything up to `seq`, `length` characters."""
        self.durable_seq, self.durable_len = seq, length
        self.marks = [m for m in self.marks if m[0] > seq]
        self.flushed_at = time.monotonic()

    def agree(self, stored_text: str, stored_seq: int) -> None:
        """Take another process's flush into account: SQL holds `stored_text` up to `stored_seq`.

        What this process has beyond it stays if it continues it exactly; otherwise it is dropped and
        the runner resends it (this process answers with the stored seq).
        """
        if stored_seq <= self.durable_seq and len(stored_text) == self.durable_len:
            return
        ends = dict(self.marks)
        if stored_seq <= self.last_seq and ends.get(stored_seq, len(self.text)) == len(stored_text) \
                and self.text.startswith(stored_text):
            self.stored(stored_seq, len(stored_text))
            return
        self.text, self.durable_len = stored_text, len(stored_text)
        self.durable_seq = self.last_seq = stored_seq
        self.marks = []

    def flush_due(self, every: float, now: float) -> bool:
        """True when the unstored tail has waited `every` seconds since the last flush."""
        return self.last_seq > self.durable_seq and now - self.flushed_at >= every


class LiveReplies:
    """This process's live replies, by task id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, LiveReply] = {}
        self._swept = time.monotonic()

    def get(self, task_id: int) -> LiveReply | None:
        """The entry of a task, if this process has one."""
        return self._entries.get(task_id)

    def put(self, entry: LiveReply) -> LiveReply:
        """Make `entry` the task's (a new attempt replaces an old one's)."""
        with self._lock:
            self._entries[entry.task_id] = entry
            self._sweep()
        return entry

    def forget(self, task_id: int) -> LiveReply | None:
        """Drop a task's entry (its attempt ended); the entry, if there was one."""
        with self._lock:
            return self._entries.pop(task_id, None)

    def text(self, task_id: int, attempt: int) -> str | None:
        """The text of a task's attempt, if this process knows it."""
        entry = self._entries.get(task_id)
        if entry is None or entry.attempt != attempt:
            return None
        return entry.text

    def mirror(self, message: dict[str, Any], stored: Any) -> bool:
        """Apply a bus message from another process; True if this process's text grew.

        `stored(task_id, attempt)` reads the stored text, for a mirror that starts late or missed a
        message: a later message that does not continue the mirror re-reads it.
        """
        task_id, attempt = message["task_id"], message["attempt"]
        offset, text = message["offset"], message["text"]
        entry = self._entries.get(task_id)
        if entry is not None and entry.lease_token is not None:
            return False  # this process took those tokens itself
        if entry is None or entry.attempt != attempt:
            base = stored(task_id, attempt)
            if base is None:
                return False
            entry = self.put(LiveReply(task_id, message["session_id"], message["interaction_id"], attempt,
                                       text=base, durable_len=len(base), durable_seq=0, last_seq=0))
        with entry.lock:
            entry.touched = time.monotonic()
            if offset > len(entry.text):
                base = stored(task_id, attempt)
                if base is not None and len(base) > len(entry.text):
                    entry.text = base
            if offset > len(entry.text) or offset + len(text) <= len(entry.text):
                return False
            entry.text += text[len(entry.text) - offset:]
            return True

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < IDLE_SECONDS / 4:
            return
        self._swept = now
        for task_id in [t for t, e in self._entries.items() if now - e.touched > IDLE_SECONDS]:
            del self._entries[task_id]
