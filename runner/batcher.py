"""One request for the events of every task a runner holds: posts that meet while one is in flight go together.

A runner with `--max-parallel 8` streams eight replies; posting each on its own would cost the API
eight requests per flush interval. Here a post that finds another in flight waits for it, and the
posts that gathered meanwhile go out as one (group commit): no added latency when the API is quick,
fewer and larger requests exactly when it is busy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runner.errors import refusal

if TYPE_CHECKING:
    from runner.client import ApiClient


@dataclass
class _Post:
    task_id: int
    lease_token: str
    events: list[dict[str, Any]]
    answer: dict[str, Any] | None = None
    error: BaseException | None = None
    done: bool = False


def _outcome(post: _Post) -> dict[str, Any]:
    """The answer for one task, or the error a lone post would have raised."""
    if post.error is not None:
        raise post.error
    answer = post.answer or {}
    code = answer.get("error")
    if code is None:
        return answer
    # The same error a lone post would have raised, told apart by the answer's code: it has no status.
    raise refusal(None, str(code), str(answer.get("message") or code))


class EventBatcher:
    """Posts events for many tasks through one client, coalescing posts that meet."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self._cond = threading.Condition()
        self._queue: list[_Post] = []
        self._sending = False

    def post(self, task_id: int, lease_token: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        """What `client.post_events` answers for this task, raising as it would."""
        mine = _Post(task_id, lease_token, events)
        with self._cond:
            self._queue.append(mine)
            while not mine.done and self._sending:
                self._cond.wait()
            if mine.done:
                return _outcome(mine)
            # Nobody is sending: this thread takes everything queued so far, its own post included.
            self._sending = True
            batch, self._queue = self._queue, []
        try:
            answers = self.client.post_events_many([
                {"task_id": p.task_id, "lease_token": p.lease_token, "events": p.events} for p in batch])
            for post, answer in zip(batch, answers, strict=True):
                post.answer = answer
        except BaseException as exc:  # the whole request failed: every post in it failed the same way
            for post in batch:
                post.error = exc
        finally:
            with self._cond:
                for post in batch:
                    post.done = True
                self._sending = False
                self._cond.notify_all()
        return _outcome(mine)
