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
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
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


def warm_topic(adapter: str) -> str:
    """The topic runners holding adapter `adapter` wait on: a task held for them was queued."""
    return f"warm:{adapter}"


def session_topic(session_id: int) -> str:
    """The topic event streams of one session wait on."""
    return f"session:{session_id}"


class _Topic:
    def __init__(self) -> None:
        self.version = 0
        # Live text of a session's reply grew (in memory, no row): followers need not read rows.
        self.text_version = 0
        self.watchers = 0
        # The waiters asleep on this topic, first come first woken; a waiter on several topics (a runner
        # polling for several kinds) sits in each of their lines with the same event.
        self.waiting: deque[threading.Event] = deque()


class Watch:
    """A waiter's place on one or more topics; `wait()` returns early if any was published meanwhile."""

    def __init__(self, lock: threading.Lock, topics: list[_Topic]) -> None:
        self._lock, self._topics = lock, topics
        # After a wait: whether rows were published (False when only live text grew).
        self.rows = True
        with lock:
            self._seen = self._versions()

    def _versions(self) -> list[tuple[int, int]]:
        return [(topic.version, topic.text_version) for topic in self._topics]

    def wait(self, timeout: float) -> bool:
        """Block until a topic is published or `timeout` passes; True if one was published."""
        with self._lock:
            event = None
            if self._versions() == self._seen:
                event = threading.Event()
                for topic in self._topics:
                    topic.waiting.append(event)
        if event is not None:
            event.wait(timeout)
        with self._lock:
            if event is not None:
                for topic in self._topics:
                    with suppress(ValueError):  # already taken off the line by the one who woke it
                        topic.waiting.remove(event)
            now = self._versions()
        woken = now != self._seen
        self.rows = not woken or any(new[0] != old[0] for new, old in zip(now, self._seen, strict=True))
        self._seen = now
        return woken


class Notifier:
    """Per-process registry of topics with waiters."""

    def __init__(self) -> None:
        # One lock for every topic's line of waiters: a waiter on several topics joins them all at once.
        self._lock = threading.Lock()
        self._topics: dict[str, _Topic] = {}
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._ticker: threading.Thread | None = None
        self._tick_seconds = 0.0

    @contextmanager
    def watch(self, *names: str) -> Iterator[Watch]:
        """Register as a waiter on topics `names` for the duration of the block."""
        with self._lock:
            topics = [self._topics.setdefault(name, _Topic()) for name in names]
            for topic in topics:
                topic.watchers += 1
        try:
            yield Watch(self._lock, topics)
        finally:
            with self._lock:
                for name, topic in zip(names, topics, strict=True):
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
            if text:
                topic.text_version += 1
            else:
                topic.version += 1
            _rouse(topic, count)

    def poke(self, name: str) -> None:
        """Wake one waiter on `name` without news: it re-checks, as if its timer had run out."""
        with self._lock:
            topic = self._topics.get(name)
            if topic is not None:
                _rouse(topic, 1)

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


def _rouse(topic: _Topic, count: int) -> None:
    """Wake the first `count` waiters asleep on `topic` (0: all), skipping any already woken by another
    of their topics: a wake-up meant for one runner is never spent on a runner that is up anyway."""
    woken = 0
    while topic.waiting and (count == 0 or woken < count):
        event = topic.waiting.popleft()
        if not event.is_set():
            event.set()
            woken += 1


def notify_payload(topics: dict[str, int]) -> str:
    """One NOTIFY payload carrying every topic of a transaction, one `count name` per line."""
    return "\n".join(f"{count} {name}" for name, count in topics.items())
