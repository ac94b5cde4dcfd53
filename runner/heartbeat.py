"""Keeps the lease on the task in hand alive while predict() or train() runs, and hears about cancellation."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from runner.client import ApiClient
from runner.errors import ApiGone, ApiUnavailable, LeaseLost, StopReason, TaskCancelled
from runner.messages import Lease

logger = logging.getLogger(__name__)


class Heartbeat:
    """A background thread renewing one task's lease every `lease.heartbeat_seconds`."""

    def __init__(self, client: ApiClient, task_id: int, lease: Lease,
                 on_stop: Callable[[StopReason], None],
                 describe: Callable[[], dict[str, Any]] | None = None) -> None:
        self.task_id = task_id
        self._describe = describe  # the runner's profile, sent with each renewal
        self._client = client
        self._lease = lease
        self._on_stop = on_stop
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"helix-heartbeat-{task_id}", daemon=True)
        self.beats = 0  # renewals the API accepted

    def start(self) -> None:
        """Start renewing in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; waits for a renewal in flight so it cannot race complete/fail."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        interval = max(self._lease.heartbeat_seconds, 0.01)
        while not self._stopped.wait(interval):
            reason = self._beat()
            if reason is not None:
                self._on_stop(reason)
                return

    def _beat(self) -> StopReason | None:
        """Renew once; the reason to stop the task, if any."""
        profile = None
        if self._describe is not None:
            try:
                profile = self._describe()
            except Exception:  # the lease matters more than the report: renew without it
                logger.exception("task %s: the runner's profile could not be read", self.task_id)
        try:
            reply = self._client.heartbeat(self.task_id, self._lease.token, profile)
        except LeaseLost:
            logger.warning("task %s: lease lost", self.task_id)
            return StopReason.LEASE_LOST
        except TaskCancelled:
            return StopReason.CANCELLED
        except ApiGone:
            return None  # the client said so once, and the task is being handed back
        except ApiUnavailable as exc:
            # The lease may still hold; the next beat tries again and the API decides.
            logger.warning("task %s: heartbeat failed: %s", self.task_id, exc)
            return None
        except Exception:
            logger.exception("task %s: heartbeat failed", self.task_id)
            return None
        if reply.get("cancelled"):
            logger.info("task %s: cancelled by the user", self.task_id)
            return StopReason.CANCELLED
        self.beats += 1
        return None
