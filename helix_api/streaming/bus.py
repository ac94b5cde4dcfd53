"""Token fan-out between API processes and replicas, over Redis pub/sub (`HELIX_BUS_URL`).

The process that takes a runner's tokens publishes them on its session's channel; every process with
a follower of that session subscribes to it, keeps a mirror of the reply's text (live.LiveReplies)
and wakes its followers. Without a bus (the embedded default, one process) nothing travels: the
followers in other processes, if any, see the text when it is flushed to SQL, at most
FLUSH_SECONDS late. Why Redis and not NATS or PostgreSQL NOTIFY: see notes.md, "The token bus".
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

Deliver = Callable[[dict[str, Any]], None]




class NoBus:
    """One process, or followers content with flush-sized steps: nothing to send or follow."""

    url = None

    def publish(self, session_id: int, messages: list[dict[str, Any]]) -> None:
        """Nothing leaves the process."""

    @contextmanager
    def follow(self, session_id: int) -> Iterator[None]:
        """Nothing to subscribe to."""
        yield

    def close(self) -> None:
        """Nothing to close."""


class RedisBus:
    """Publishes token messages and subscribes to the sessions this process's followers watch."""

    def __init__(self, url: str, deliver: Deliver, namespace: str = "helix") -> None:
        import redis  # only deployments with a bus need it

        self.url, self.namespace = url, namespace
        self._redis = redis.Redis.from_url(url)
        self._deliver = deliver
        self._lock = threading.Lock()
        self._followers: dict[int, int] = {}
        self._changes: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="helix-bus", daemon=True)
        self._thread.start()

    def channel(self, session_id: int) -> str:
        """The channel a session's tokens travel on: deployments sharing a Redis differ by namespace."""
        return f"{self.namespace}:session:{session_id}"

    def publish(self, session_id: int, messages: list[dict[str, Any]]) -> None:
        """Send a post's tokens of one session to its followers elsewhere; a lost message costs a delay only."""
        try:
            self._redis.publish(self.channel(session_id), json.dumps(messages))
        except Exception as exc:  # followers elsewhere fall back to the stored text
            logger.warning("bus: publishing to session %s failed: %s", session_id, exc)

    @contextmanager
    def follow(self, session_id: int) -> Iterator[None]:
        """Receive the session's tokens for the duration of the block."""
        with self._lock:
            self._followers[session_id] = self._followers.get(session_id, 0) + 1
            first = self._followers[session_id] == 1
        if first:
            self._changes.put(("subscribe", self.channel(session_id)))
        try:
            yield
        finally:
            with self._lock:
                self._followers[session_id] -= 1
                last = self._followers[session_id] == 0
                if last:
                    del self._followers[session_id]
            if last:
                self._changes.put(("unsubscribe", self.channel(session_id)))

    def close(self) -> None:
        """Stop listening (within a fraction of a second)."""
        self._stopping.set()

    def _listen(self) -> None:
        # One thread owns the subscription: redis-py's PubSub is not safe to share between threads.
        delay = 0.1
        while not self._stopping.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                with self._lock:
                    sessions = list(self._followers)
                if sessions:
                    pubsub.subscribe(*[self.channel(s) for s in sessions])
                while not self._stopping.is_set():
                    self._apply_changes(pubsub)
                    message = pubsub.get_message(timeout=0.05)
                    if message is not None and message.get("type") == "message":
                        self._relay(message["data"])
                delay = 0.1
            except Exception as exc:
                logger.warning("bus: connection to %s failed (%s); again in %.1fs", self.url, exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                pubsub.close()

    def _apply_changes(self, pubsub: Any) -> None:
        while True:
            try:
                action, name = self._changes.get_nowait()
            except queue.Empty:
                return
            getattr(pubsub, action)(name)

    def _relay(self, data: bytes) -> None:
        try:
            messages = json.loads(data)
        except ValueError:
            logger.warning("bus: dropped a message that is not JSON")
            return
        for message in messages:
            try:
                self._deliver(message)
            except Exception:
                logger.exception("bus: delivering a token message failed")


def make_bus(url: str | None, deliver: Deliver, namespace: str = "helix") -> NoBus | RedisBus:
    """The bus `HELIX_BUS_URL` names (redis://...), or none."""
    if not url:
        return NoBus()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBus(url, deliver, namespace)
    raise ValueError(f"HELIX_BUS_URL must be a redis:// URL, not {url!r}")
