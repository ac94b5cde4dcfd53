"""Wake-ups for long-polling runners and event streams, within a process and across processes.

A writer names topics (`queue:create:text:<model>`, `session:<id>`) in its transaction; once it
commits, waiters on those topics in this process wake at once. On PostgreSQL the same topics go out
with NOTIFY inside the transaction, and a listener thread in every API process passes them on, so a
runner long-polling one replica wakes when another replica queues work. Waiters also re-check on a
timer, so a lost wake-up (or work queued by another process on SQLite) costs a delay, never a task.
That timer is one ticker thread per process, which wakes one waiter of each queue topic per tick:
a thousand idle long-polls then cost a few wake-ups a second, not a thousand (each of them re-reading
the queue), and each waiter otherwise sleeps until it is woken or its wait ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

CHANNEL = "helix"
_INFO_KEY = "helix_topics"
QUEUE_PREFIX = "queue:"


def publish(db: Any, topic: str, count: int = 1) -> None:
    """Wake `count` waiters on `topic` (0 means all) once `db`'s transaction commits.

    `db` is an ORM session or a Connection of `Database.write()`/`transaction()`.
    """
    topics: dict[str, int] = db.info.setdefault(_INFO_KEY, {})
    previous = topics.get(topic)
    topics[topic] = 0 if count == 0 or previous == 0 else (previous or 0) + count


def take_published(db: Any) -> dict[str, int]:
    """The topics published in this transaction, forgetting them."""
    return db.info.pop(_INFO_KEY, None) or {}


def queue_topic(mode: str, type_: str, model_name: str) -> str:
    """The topic runners polling one (mode, type, model) wait on."""
    return f"{QUEUE_PREFIX}{mode}:{type_}:{model_name}"


def session_topic(session_id: int) -> str:
    """The topic event streams of one session wait on."""
    return f"session:{session_id}"


class _Topic:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.version = 0
        # Live text of a session's reply grew (in memory, no row): followers need not read rows.
        self.text_version = 0
        self.watchers = 0


class Watch:
    """A waiter's place on one topic; `wait()` returns early if anything was published meanwhile."""

    def __init__(self, topic: _Topic) -> None:
        self._topic = topic
        # After a wait: whether rows were published (False when only live text grew).
        self.rows = True
        with topic.cond:
            self._seen = (topic.version, topic.text_version)

    def wait(self, timeout: float) -> bool:
        """Block until the topic is published or `timeout` passes; True if it was published."""
        topic = self._topic
        with topic.cond:
            if (topic.version, topic.text_version) == self._seen:
                topic.cond.wait(timeout)
            now = (topic.version, topic.text_version)
            woken = now != self._seen
            self.rows = not woken or now[0] != self._seen[0]
            self._seen = now
            return woken


class Notifier:
    """Per-process registry of topics with waiters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._topics: dict[str, _Topic] = {}
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._ticker: threading.Thread | None = None
        self._tick_seconds = 0.0

    @contextmanager
    def watch(self, name: str) -> Iterator[Watch]:
        """Register as a waiter on `name` for the duration of the block."""
        with self._lock:
            topic = self._topics.setdefault(name, _Topic())
            topic.watchers += 1
        try:
            yield Watch(topic)
        finally:
            with self._lock:
                topic.watchers -= 1
                if topic.watchers == 0 and self._topics.get(name) is topic:
                    del self._topics[name]

    def notify(self, name: str, count: int = 0) -> None:
        """Wake `count` waiters on `name` in this process (0: all of them)."""
        self._wake(name, count, text=False)

    def notify_text(self, name: str) -> None:
        """Wake every waiter on `name` because live text grew; no row was stored."""
        self._wake(name, 0, text=True)

    def _wake(self, name: str, count: int, *, text: bool) -> None:
        with self._lock:
            topic = self._topics.get(name)
        if topic is None:
            return
        with topic.cond:
            if text:
                topic.text_version += 1
            else:
                topic.version += 1
            if count:
                topic.cond.notify(count)
            else:
                topic.cond.notify_all()

    def poke(self, name: str) -> None:
        """Wake one waiter on `name` without news: it re-checks, as if its timer had run out."""
        with self._lock:
            topic = self._topics.get(name)
        if topic is not None:
            with topic.cond:
                topic.cond.notify(1)

    def tick_every(self, seconds: float) -> None:
        """Poke one waiter of every queue topic each `seconds` (the re-check), from one thread."""
        with self._lock:
            self._tick_seconds = seconds
            if self._ticker is not None:
                return
            self._ticker = threading.Thread(target=self._tick_loop, name="helix-recheck", daemon=True)
        self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._stopping.wait(self._tick_seconds):
            with self._lock:
                names = [name for name in self._topics if name.startswith(QUEUE_PREFIX)]
            for name in names:
                self.poke(name)

    def notify_many(self, topics: dict[str, int]) -> None:
        """Notify each topic with its count."""
        for name, count in topics.items():
            self.notify(name, count)

    def listen(self, dsn: str, ready_timeout: float = 5.0) -> None:
        """Start the thread that relays PostgreSQL NOTIFY messages to this process's waiters."""
        if self._listener is not None:
            return
        self._listener = threading.Thread(target=self._listen_loop, args=(dsn,), name="helix-listen",
                                          daemon=True)
        self._listener.start()
        # Wait for LISTEN to be in place, so the first wake-ups are not lost to a race.
        if not self._listening.wait(ready_timeout):
            logger.warning("LISTEN not ready after %.0fs; waiters fall back to re-checking", ready_timeout)

    def stop(self) -> None:
        """Stop the listener and ticker threads (at most a second or a tick later)."""
        self._stopping.set()

    def _listen_loop(self, dsn: str) -> None:
        import psycopg  # only PostgreSQL deployments need it

        delay, lost = 0.1, False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    if lost:
                        logger.warning("LISTEN connection back")
                    delay, lost = 0.1, False
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._relay(note.payload.splitlines())
            except Exception as err:
                if self._stopping.is_set():
                    return
                if not isinstance(err, psycopg.OperationalError):
                    logger.exception("LISTEN connection failed; reconnecting in %.1fs", delay)
                elif not lost:  # the database is out of reach: said once, not at every retry
                    logger.warning("LISTEN connection lost, reconnecting (waiters re-check meanwhile): %s",
                                   str(err).strip().splitlines()[0][:200])
                lost = isinstance(err, psycopg.OperationalError)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)

    def _relay(self, lines: Iterable[str]) -> None:
        for line in lines:
            count, _, name = line.partition(" ")
            self.notify(name, int(count or 0))


def notify_payload(topics: dict[str, int]) -> str:
    """One NOTIFY payload carrying every topic of a transaction, one `count name` per line."""
    return "\n".join(f"{count} {name}" for name, count in topics.items())
