"""The callback a backend reports through: numbered events, posted in small batches off the hot path."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runner.errors import ApiError, ApiGone, ApiUnavailable, EventsGap, LeaseLost, StopReason, TaskCancelled

if TYPE_CHECKING:
    from runner.files import TaskFiles

logger = logging.getLogger(__name__)

PostEvents = Callable[[list[dict[str, Any]]], dict[str, Any]]


class Report:
    """Handed to `predict(task, report)`: stream tokens, progress and logs; raises once told to stop."""

    def __init__(self, task_id: int, post: PostEvents, *, flush_interval: float = 0.05,
                 batch_size: int = 32, files: TaskFiles | None = None) -> None:
        self.task_id = task_id
        # The task's inputs to fetch and outputs to upload, under the same lease as the events.
        self.files = files
        self._post = post
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._wake = threading.Condition()
        self._pending: list[dict[str, Any]] = []  # in seq order; not posted yet
        # Posted, but the API holds them only in memory so far (beyond its `durable_seq`): kept to
        # resend should it restart before storing them (it answers events_gap).
        self._unstored: list[dict[str, Any]] = []
        self._seq = 0
        self._reason: StopReason | None = None
        self._closing = False
        self._posting = threading.Lock()  # one post at a time keeps batches in seq order
        self._thread: threading.Thread | None = None

    # What a backend calls.

    def token(self, text: str) -> None:
        """Stream a piece of generated text."""
        self._emit({"kind": "token", "text": text})

    def progress(self, step: int, total: int, message: str | None = None, **extra: Any) -> None:
        """Report progress, e.g. a denoising step out of the total."""
        event: dict[str, Any] = {**extra, "kind": "progress", "step": step, "total": total}
        if message is not None:
            event["message"] = message
        self._emit(event)

    def log(self, message: str, level: str = "info") -> None:
        """Record a line the user may see next to the reply."""
        self._emit({"kind": "log", "level": level, "message": message})

    def check(self) -> None:
        """Raise TaskCancelled if the task must stop; call it in loops that emit nothing."""
        if self._reason is not None:
            raise TaskCancelled(self._reason)

    @property
    def cancelled(self) -> bool:
        """True once the task must stop (cancelled, lease lost, or the runner is shutting down)."""
        return self._reason is not None

    # What the runner calls.

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the task must stop, or None while it may go on."""
        return self._reason

    @property
    def last_seq(self) -> int:
        """The seq of the last event emitted."""
        return self._seq

    def cancel(self, reason: StopReason) -> None:
        """Tell the backend to stop; the first reason given wins."""
        with self._wake:
            if self._reason is None:
                self._reason = reason
                logger.info("task %s: stopping (%s)", self.task_id, reason)
            self._wake.notify_all()

    def start(self) -> None:
        """Start posting events in the background."""
        self._thread = threading.Thread(target=self._run, name=f"helix-events-{self.task_id}", daemon=True)
        self._thread.start()

    def close(self, flush: bool = True) -> bool:
        """Stop the background poster, then post what is left unless told not to; True if all stored."""
        self._stop_poster()
        if not flush:
            with self._wake:
                dropped, self._pending = len(self._pending), []
            if dropped:
                logger.info("task %s: dropped %d unsent events", self.task_id, dropped)
            return dropped == 0
        return self.flush()

    def close_for_result(self, carry: int) -> list[dict[str, Any]] | None:
        """Stop the background poster and hand over the last unsent events to go with the result.

        Posts all but the last `carry` first; None when those could not be posted (or the task must stop).
        """
        self._stop_poster()
        with self._posting:
            while True:
                with self._wake:
                    extra = len(self._pending) - carry
                    if extra <= 0:
                        # What the API may not have stored goes along: it takes each seq once.
                        tail, self._pending, self._unstored = self._unstored + self._pending, [], []
                        return tail
                    batch = self._pending[: min(extra, self._batch_size)]
                if not self._post_batch(batch) or self._reason is not None:
                    return None
                with self._wake:
                    del self._pending[: len(batch)]

    def flush(self) -> bool:
        """Post every pending event in batches; True when all are stored, else they stay pending."""
        with self._posting:
            while True:
                with self._wake:
                    batch = self._pending[: self._batch_size]
                if not batch:
                    return True
                if not self._post_batch(batch):
                    return False
                with self._wake:
                    # Only this method removes events and appends go to the end: the batch is the head.
                    del self._pending[: len(batch)]

    # Internals.

    def _stop_poster(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _emit(self, event: dict[str, Any]) -> None:
        self.check()
        with self._wake:
            self._seq += 1
            event["seq"] = self._seq
            self._pending.append(event)
            if len(self._pending) >= self._batch_size:
                self._wake.notify_all()

    def _post_batch(self, batch: list[dict[str, Any]]) -> bool:
        """Post one batch; False leaves it pending, except when it can never be stored."""
        try:
            reply = self._post(batch)
        except EventsGap as exc:
            # The API lost what it had not stored (it restarted): everything unstored goes again.
            with self._wake:
                if self._unstored and self._pending[:1] == batch[:1]:
                    self._pending[:0], self._unstored = self._unstored, []
            logger.info("task %s: resending events from seq %s (%s)", self.task_id, self._pending[0]["seq"], exc)
            return False
        except ApiGone:
            return False  # the client said so once, and the task is being handed back
        except ApiUnavailable as exc:
            # The same seq numbers go again next time; the API stores each seq once.
            logger.warning("task %s: events %d-%d not posted yet: %s", self.task_id, batch[0]["seq"],
                           batch[-1]["seq"], exc)
            return False
        except TaskCancelled:
            self._give_up(StopReason.CANCELLED)
            return False
        except LeaseLost:
            self._give_up(StopReason.LEASE_LOST)
            return False
        except ApiError:
            # Resending would be refused again (say, 413): skip it rather than block the stream.
            logger.exception("task %s: events %d-%d refused, skipped", self.task_id, batch[0]["seq"],
                             batch[-1]["seq"])
            return True
        if reply.get("cancelled"):
            self.cancel(StopReason.CANCELLED)
        durable = reply.get("durable_seq", batch[-1]["seq"])
        with self._wake:
            self._unstored = [e for e in self._unstored + batch if e["seq"] > durable]
        return True

    def _give_up(self, reason: StopReason) -> None:
        """Nothing more can be stored for this attempt: stop the backend and forget what is pending."""
        self.cancel(reason)
        with self._wake:
            self._pending = []

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or len(self._pending) >= self._batch_size,
                                    timeout=self._flush_interval)
                if self._closing:
                    return  # close() does the final flush, on the caller's thread
            try:
                self.flush()
            except Exception:
                # The poster must outlive any surprise, or tokens would silently stop flowing.
                logger.exception("task %s: posting events failed", self.task_id)
