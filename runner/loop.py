"""The runner's main loop: set the backend up once, then claim, predict, report, finish; until stopped."""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from runner.backends.base import Backend
from runner.batcher import EventBatcher
from runner.client import ApiClient
from runner.config import RunnerConfig
from runner.errors import ApiError, ApiUnavailable, BadTaskInput, LeaseLost, StopReason, TaskCancelled
from runner.files import TaskFiles
from runner.heartbeat import Heartbeat
from runner.messages import Claim, Lease, Task
from runner.reporter import Report

logger = logging.getLogger(__name__)

CARRY_EVENTS = 256  # unsent events that go with the result; older ones are posted first
TRACEBACK_LINES = 20  # enough to see where it broke, small enough for the reply's error field


def traceback_tail(exc: BaseException, lines: int = TRACEBACK_LINES) -> str:
    """The last lines of an exception's traceback, ending with the exception itself."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    return "\n".join(text.splitlines()[-lines:])


class Runner:
    """Pulls tasks for one backend and runs them in-process until stopped.

    With `config.max_parallel` N > 1 (capped by a backend's own `max_parallel` attribute, read after
    setup()), N slots each claim and work one task at a time on their own thread, so the backend's
    predict() is called for up to N held tasks at once; the main thread only waits, free for signals.
    """

    def __init__(self, config: RunnerConfig, backend: Backend, client: ApiClient) -> None:
        self.config = config
        self.backend = backend
        self.client = client
        self.handled = 0  # tasks claimed and finished one way or another
        self._stopping = threading.Event()
        # Reports of the tasks in hand, by task id. Read by stop(), which may run in a signal handler on
        # the main thread: no locks around it (single dict operations are atomic).
        self._reports: dict[int, Report] = {}
        self._grace_timer: threading.Timer | None = None
        self._counting = threading.Lock()
        self._reserved = 0  # tasks claimed or being claimed, against max_tasks
        self._slot_error: BaseException | None = None
        self._batcher: EventBatcher | None = None

    def run(self, max_tasks: int | None = None) -> int:
        """Set the backend up, then work until stopped or `max_tasks` are done; the number handled."""
        limit = max_tasks if max_tasks is not None else self.config.max_tasks
        cfg = self.config
        try:
            logger.info("runner %s: setting up backend %s", cfg.runner_name, cfg.backend or self.backend)
            self.backend.setup()
            slots = self.slots()
            logger.info("runner %s: claiming mode=%s type=%s model_name=%s from %s (%d at a time)",
                        cfg.runner_name, cfg.mode, cfg.type, cfg.model_name, cfg.api_url, slots)
            if slots == 1:
                self._serve(limit)
            else:
                self._serve_in_parallel(slots, limit)
        finally:
            self._teardown()
        return self.handled

    def slots(self) -> int:
        """How many tasks this runner holds at once: max_parallel, capped by the backend's own."""
        cap = getattr(self.backend, "max_parallel", None)
        wanted = max(1, int(getattr(self.config, "max_parallel", 1) or 1))
        return max(1, min(wanted, int(cap))) if cap else wanted

    def stop(self) -> None:
        """Stop taking work; the tasks in hand get `grace_seconds` to finish, then go back.

        Never blocks, so a signal handler may call it. A second call hands the tasks back at once.
        """
        reports = list(self._reports.values())
        if self._stopping.is_set():
            logger.warning("runner %s: stopping now", self.config.runner_name)
            self._hand_back_held()
            return
        self._stopping.set()
        if not reports:
            logger.info("runner %s: stopping", self.config.runner_name)
            return
        for report in reports:
            logger.info("task %s: runner stopping; %.1fs to finish before it goes back", report.task_id,
                        self.config.grace_seconds)
        self._grace_timer = threading.Timer(self.config.grace_seconds, self._hand_back_held)
        self._grace_timer.daemon = True
        self._grace_timer.start()

    def _hand_back_held(self) -> None:
        """Tell every task still in hand to stop; each goes back to the queue."""
        for report in list(self._reports.values()):
            report.cancel(StopReason.SHUTDOWN)

    # Slots.

    def _serve(self, limit: int | None) -> None:
        """Claim and work one task at a time until stopped or `limit` tasks are taken (by all slots)."""
        while not self._stopping.is_set() and self._reserve(limit):
            claim = self._next_claim()
            if claim is None:
                self._unreserve()
                continue
            self._work(claim)
            with self._counting:
                self.handled += 1

    def _serve_in_parallel(self, slots: int, limit: int | None) -> None:
        """Run `slots` claim-and-work loops on their own threads; re-raise the first that failed."""
        self._batcher = EventBatcher(self.client)  # the slots' event posts share requests
        threads = [threading.Thread(target=self._serve_slot, args=(limit,), name=f"helix-slot-{index}",
                                    daemon=True) for index in range(slots)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)  # short joins leave the main thread free to run signal handlers
        if self._slot_error is not None:
            raise self._slot_error

    def _serve_slot(self, limit: int | None) -> None:
        try:
            self._serve(limit)
        except BaseException as exc:  # handed to the main thread, which raises it from run()
            with self._counting:
                self._slot_error = self._slot_error or exc
            self.stop()  # the other slots finish (or hand back) what they hold, then exit

    def _reserve(self, limit: int | None) -> bool:
        with self._counting:
            if limit is not None and self._reserved >= limit:
                return False
            self._reserved += 1
            return True

    def _unreserve(self) -> None:
        with self._counting:
            self._reserved -= 1

    # Claiming.

    def _next_claim(self) -> Claim | None:
        """The next task, or None after a pause when there is none or the API is unavailable."""
        started = time.monotonic()
        try:
            claim = self._poll()
        except ApiUnavailable as exc:
            # The client already backed off; keep polling for as long as it takes the API to return.
            logger.warning("runner %s: API unavailable, polling again in %.1fs: %s", self.config.runner_name,
                           self.config.error_backoff, exc)
            self._stopping.wait(self.config.error_backoff)
            return None
        if claim is None:
            # Keeps an API that answers a long poll at once from being hammered.
            rest = self.config.idle_sleep - (time.monotonic() - started)
            if rest > 0:
                self._stopping.wait(rest)
        return claim

    def _poll(self) -> Claim | None:
        """Claim on a helper thread, so a stop() need not wait out a long poll."""
        cfg = self.config
        done, guard = threading.Event(), threading.Lock()
        box: dict[str, Any] = {"abandoned": False}

        def poll() -> None:
            try:
                box["claim"] = self.client.claim(cfg.mode, cfg.type, cfg.model_name, wait=cfg.wait,
                                                 interrupt=self._stopping)
            except BaseException as exc:  # handed to the main thread, which decides
                box["error"] = exc
            with guard:
                done.set()
                orphan = box["abandoned"] and box.get("claim")
            if orphan:
                self._release(orphan.task, orphan.lease, "the runner stopped while claiming")

        threading.Thread(target=poll, name="helix-claim", daemon=True).start()
        while not done.wait(0.05):
            if self._stopping.is_set():
                with guard:
                    box["abandoned"] = not done.is_set()
                if box["abandoned"]:
                    # An idle runner holds nothing, so it exits at once. Should the poll still bring a
                    # task, the helper hands it back; if the process is gone by then, its lease runs out.
                    return None
        if "error" in box:
            raise box["error"]
        claim: Claim | None = box.get("claim")
        if claim is not None and self._stopping.is_set():
            self._release(claim.task, claim.lease, "the runner is stopping")
            return None
        return claim

    # Working.

    def _work(self, claim: Claim) -> None:
        """Run one claimed task to its end: complete, fail, release, or drop."""
        task, lease = claim.task, claim.lease
        logger.info("task %s: claimed (attempt %s, session %s, interaction %s)", task.id, task.attempt,
                    task.session_id, task.interaction_id)
        post = self._batcher.post if self._batcher is not None else self.client.post_events
        report = Report(task.id, functools.partial(post, task.id, lease.token),
                        flush_interval=self.config.flush_interval, batch_size=self.config.batch_size,
                        files=TaskFiles(self.client, task.id, lease.token, Path(self.config.cache_dir)))
        self._reports[task.id] = report
        if self._stopping.is_set():  # stop() came between the claim and now
            self._reports.pop(task.id, None)
            self._release(task, lease, "the runner is stopping")
            return
        heartbeat = Heartbeat(self.client, task.id, lease, on_stop=report.cancel)
        report.start()
        heartbeat.start()
        started = time.monotonic()
        try:
            try:
                result = self.backend.predict(task, report)
            finally:
                # Before complete/fail: a renewal in flight must not race the task's end.
                heartbeat.stop()
                self._reports.pop(task.id, None)
        except TaskCancelled as exc:
            self._stopped(task, lease, report, report.stop_reason or exc.reason)
        except Exception as exc:
            if report.stop_reason is not None:
                # Most likely the backend tripping over its own cancellation: not a crash of the task.
                logger.info("task %s: predict() raised %r while stopping", task.id, exc)
                self._stopped(task, lease, report, report.stop_reason)
            elif isinstance(exc, BadTaskInput):
                logger.error("task %s: cannot be done as given: %s", task.id, exc)
                self._fail(task, lease, report, str(exc), retry=False)
            else:
                logger.exception("task %s: predict() failed", task.id)
                self._fail(task, lease, report, traceback_tail(exc), retry=True)
        else:
            if report.stop_reason in (StopReason.CANCELLED, StopReason.LEASE_LOST):
                self._stopped(task, lease, report, report.stop_reason)
            elif not isinstance(result, dict):
                logger.error("task %s: predict() returned %s, not a dict", task.id, type(result).__name__)
                error = f"backend returned {type(result).__name__}, not a JSON object"
                self._fail(task, lease, report, error, retry=False)
            else:
                # A task that finished inside the grace period (or despite it) is worth keeping.
                self._complete(task, lease, report, result, time.monotonic() - started)

    def _complete(self, task: Task, lease: Lease, report: Report, result: dict[str, Any],
                  elapsed: float) -> None:
        # The last events ride with the result: one round trip at the end of every task, not two.
        carried = report.close_for_result(carry=CARRY_EVENTS)
        if carried is None:
            if report.stop_reason in (StopReason.CANCELLED, StopReason.LEASE_LOST):
                self._stopped(task, lease, report, report.stop_reason)  # found out while flushing
                return
            logger.warning("task %s: completing with some events unsent", task.id)
            carried = []
        try:
            try:
                self.client.complete(task.id, lease.token, result, carried)
            except ApiError as exc:
                if not carried or isinstance(exc, LeaseLost):
                    raise
                # Events the API will never take (as a post would have been) must not cost the result.
                logger.exception("task %s: events %d-%d refused with the result; completing without them",
                                 task.id, carried[0]["seq"], carried[-1]["seq"])
                self.client.complete(task.id, lease.token, result)
        except ApiError as exc:
            if isinstance(exc, LeaseLost):
                logger.warning("task %s: lease lost before completing; result dropped", task.id)
                return
            logger.error("task %s: result refused: %s", task.id, exc)
            self._send(task, "fail", self.client.fail, task.id, lease.token,
                       f"the API refused the result: {exc.api_message}", False)
            return
        except (TaskCancelled, ApiUnavailable) as exc:
            logger.warning("task %s: not completed: %s", task.id, exc)
            return
        logger.info("task %s: complete in %.2fs (%d events)", task.id, elapsed, report.last_seq)

    def _fail(self, task: Task, lease: Lease, report: Report, error: str, retry: bool) -> None:
        report.close(flush=True)  # the tokens streamed so far help whoever reads the error
        self._send(task, "fail", self.client.fail, task.id, lease.token, error, retry)

    def _stopped(self, task: Task, lease: Lease, report: Report, reason: StopReason) -> None:
        """The task stopped before its end; the reason says what the API must be told."""
        # Nothing more can be stored once cancelled or lost, and a released attempt starts afresh.
        report.close(flush=False)
        if reason == StopReason.CANCELLED:
            logger.info("task %s: cancelled by the user", task.id)
        elif reason == StopReason.LEASE_LOST:
            logger.warning("task %s: lease lost; dropped", task.id)
        else:
            self._release(task, lease, "the runner is stopping")

    def _release(self, task: Task, lease: Lease, why: str) -> None:
        logger.info("task %s: handing back: %s", task.id, why)
        self._send(task, "release", self.client.release, task.id, lease.token)

    def _send(self, task: Task, action: str, call: Any, *args: Any) -> None:
        """Tell the API how a task ended; whatever goes wrong, the loop carries on."""
        try:
            reply = call(*args)
        except LeaseLost:
            logger.warning("task %s: lease lost before %s", task.id, action)
        except TaskCancelled:
            logger.info("task %s: cancelled by the user before %s", task.id, action)
        except ApiUnavailable:
            # The lease runs out and the API requeues the task: nothing is lost but time.
            logger.exception("task %s: %s not sent, API unavailable", task.id, action)
        except ApiError:
            logger.exception("task %s: %s refused", task.id, action)
        else:
            logger.info("task %s: %s -> %s", task.id, action, reply.get("status", "ok"))

    def _teardown(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self.client.close()
        logger.info("runner %s: stopped after %d tasks", self.config.runner_name, self.handled)
