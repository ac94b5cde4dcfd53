"""The runner's main loop: set the backend up once, then claim a task, run an attempt at it, settle; until stopped."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner import metrics, profile
from runner.attempt import STOPPING, Attempt, Complete, Release
from runner.backends.base import Backend
from runner.batcher import EventBatcher
from runner.client import ApiClient
from runner.config import RunnerConfig
from runner.errors import ApiError, ApiGone, ApiUnavailable, StopReason
from runner.files import TaskFiles
from runner.gate import SlotGate
from runner.hardware import HardwareReader
from runner.messages import Claim
from runner.reporter import Report

logger = logging.getLogger(__name__)


class Runner:
    """Pulls tasks for one backend and runs them in-process until stopped.

    With N > 1 slots (the backend's `max_parallel`, read after setup(), capped by `config.max_parallel`),
    each slot claims and works one task at a time on its own thread, so the backend's predict() or
    train() runs for up to N held tasks at once; the main thread only waits, free for signals.

    Round trips: a `complete` also claims the slot's next task, and with several slots one long-poll
    at a time claims for every idle slot (`max=`), handing the extra tasks to the others.
    """

    def __init__(self, config: RunnerConfig, backend: Backend, client: ApiClient) -> None:
        self.config = config
        self.backend = backend
        self.client = client
        self.handled = 0  # tasks claimed and finished one way or another
        self._stopping = threading.Event()
        # Reports of the tasks whose backend call is running, by task id. Read by stop(), which may run
        # in a signal handler on the main thread: no locks around it (single dict operations are atomic).
        self._reports: dict[int, Report] = {}
        self._grace_timer: threading.Timer | None = None
        self._counting = threading.Lock()
        self._reserved = 0  # tasks claimed or being claimed, against max_tasks
        self._slot_error: BaseException | None = None
        self._batcher: EventBatcher | None = None
        # With several slots: one slot at a time polls for all idle ones; what it gets beyond its own
        # task waits here for the others.
        self._spare: deque[Claim] = deque()
        self._poll_lock = threading.Lock()
        self._idle = 0  # slots holding no task: what one poll claims for
        self._limit: int | None = None
        self._slots = 1  # set once the backend is set up
        self._registered = False  # whether the API has heard this runner's profile
        # The adapters the API last heard this runner holds: it routes their tasks here (warm routing) by what
        # it stored, and a heartbeat may be too rare (or stored too seldom) to tell it of a new one in time.
        self._reported_adapters: frozenset[str] = frozenset()
        # With several slots on a runner of both inference and fine-tuning: a fine-tune runs alone.
        self._gate: SlotGate | None = None
        self.hardware = HardwareReader()

    def describe(self) -> dict[str, Any]:
        """This runner's profile: hardware, backend, kinds, slots (busy: tasks whose backend call runs)."""
        return profile.describe(self.config, self.backend, slots=self._slots, busy=len(self._reports),
                                hardware=self.hardware)

    def _register(self) -> None:
        """Tell the API what this runner is, until it has heard, and again when its adapters changed (one request
        per adapter loaded, far cheaper than the load); an API that cannot take it costs a log line."""
        adapters = frozenset(profile.loaded_adapters(self.backend))  # a set: using one reorders the list
        if self._registered and adapters == self._reported_adapters:
            return
        try:
            self.client.register(self.describe())
            self._registered = True
            self._reported_adapters = adapters
        except ApiError as exc:
            if exc.status in (401, 403):
                raise  # a claim would be refused the same way: say so now
            # An API from before the report (404) or one refusing it (400): the runner serves all the same.
            self._registered, self._reported_adapters = True, adapters
            logger.warning("runner %s: the API did not take its profile: %s", self.config.runner_name, exc)
        except ApiUnavailable as exc:
            # Tried again before the next claim; heartbeats carry the profile too.
            logger.warning("runner %s: could not send its profile yet: %s", self.config.runner_name, exc)

    def run(self, max_tasks: int | None = None) -> int:
        """Set the backend up, then work until stopped or `max_tasks` are done; the number handled."""
        limit = max_tasks if max_tasks is not None else self.config.max_tasks
        cfg = self.config
        try:
            logger.info("runner %s: setting up backend %s", cfg.runner_name, cfg.backend or self.backend)
            loading = metrics.Timer()
            self.backend.setup()
            metrics.MODEL_LOAD_SECONDS.set(loading.elapsed)
            slots = self._slots = self.slots()
            metrics.SLOTS.set(slots)
            logger.info("runner %s: claiming %s from %s (%d at a time)", cfg.runner_name,
                        "; ".join(f"mode={k.mode} type={k.type} model_name={k.model_name}" for k in cfg.kinds),
                        cfg.api_url, slots)
            if slots == 1:
                self._serve(limit)
            else:
                self._serve_in_parallel(slots, limit)
        finally:
            self._teardown()
        return self.handled

    def slots(self) -> int:
        """How many tasks this runner holds at once: the backend's max_parallel, capped by the config's."""
        # Declared on every Backend (read after setup(), which may change it); a backend that does not
        # declare it has not said it can share its model.
        backend = int(getattr(self.backend, "max_parallel", 1))
        if self.config.parallel_auto and not getattr(self.backend, "sizes_slots", False):
            backend = 1  # auto, and nothing to size by (no model config): one at a time
        return max(1, min(backend, self.config.max_parallel))

    def stop(self) -> None:
        """Stop taking work; the tasks in hand get `grace_seconds` to finish, then go back.

        Never blocks, so a signal handler may call it. A second call hands the tasks back at once.
        """
        reports = list(self._reports.values())
        # An API that stays unreachable this long after the stop is gone: the tasks in hand stop at once
        # (their hand-backs cannot be sent; their leases run out) and the runner exits.
        self.client.stopping(self.config.api_grace_seconds, on_gone=self._hand_back_held)
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
        claim: Claim | None = None  # a task in hand, reserved: claimed by the last complete
        while not self._stopping.is_set():
            if claim is None:
                if not self._reserve(limit):
                    break
                claim = self._next_claim()
                if claim is None:
                    self._unreserve()
                    continue
            claim = self._work(claim, limit)
            with self._counting:
                self.handled += 1
        if claim is not None:  # stopped holding the task its last complete claimed: hand it back
            self._attempt(claim).settle(STOPPING)
            self._unreserve()

    def _serve_in_parallel(self, slots: int, limit: int | None) -> None:
        """Run `slots` claim-and-work loops on their own threads; re-raise the first that failed."""
        self._batcher = EventBatcher(self.client)  # the slots' event posts share requests
        if self.config.predicts and self.config.trains:
            self._gate = SlotGate()
        self._idle, self._limit = slots, limit
        threads = [threading.Thread(target=self._serve_slot, args=(limit,), name=f"helix-slot-{index}",
                                    daemon=True) for index in range(slots)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)  # short joins leave the main thread free to run signal handlers
        while self._spare:  # claimed for slots that stopped before taking them
            self._attempt(self._spare.popleft()).settle(STOPPING)
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
        if self._batcher is not None:  # several slots
            return self._next_shared_claim()
        return self._claim_or_pause(functools.partial(self._poll, 1))

    def _next_shared_claim(self) -> Claim | None:
        """With several slots: a spare task another slot claimed, else one poll for every idle slot."""
        while not self._stopping.is_set():
            try:
                return self._spare.popleft()
            except IndexError:
                pass
            if self._gate is not None and self._gate.training:
                # A fine-tune runs (or waits for the chats in hand to end) alone: claim nothing meanwhile.
                self._stopping.wait(0.1)
                continue
            if not self._poll_lock.acquire(timeout=0.1):
                continue
            try:
                if self._spare:
                    continue
                with self._counting:
                    # Every slot holding no task, as far as max_tasks leaves room (this one has reserved).
                    count = max(1, self._idle)
                    if self._limit is not None:
                        count = max(1, min(count, 1 + self._limit - self._reserved))
                return self._claim_or_pause(functools.partial(self._poll, count))
            finally:
                self._poll_lock.release()
        return None

    def _claim_or_pause(self, poll: Callable[[], list[Claim]]) -> Claim | None:
        started = time.monotonic()
        self._register()
        try:
            claims: list[Claim] = poll()
        except ApiGone:
            return None  # stopping, and the client said so once
        except ApiUnavailable as exc:
            # The client already backed off; keep polling for as long as it takes the API to return.
            logger.warning("runner %s: API unavailable, polling again in %.1fs: %s", self.config.runner_name,
                           self.config.error_backoff, exc)
            self._stopping.wait(self.config.error_backoff)
            return None
        if not claims:
            # Keeps an API that answers a long poll at once from being hammered.
            rest = self.config.idle_sleep - (time.monotonic() - started)
            if rest > 0:
                self._stopping.wait(rest)
            return None
        self._spare.extend(claims[1:])
        return claims[0]

    def _poll(self, count: int) -> list[Claim]:
        """Claim up to `count` tasks on a helper thread, so a stop() need not wait out a long poll."""
        cfg = self.config
        done, guard = threading.Event(), threading.Lock()
        box: dict[str, Any] = {"abandoned": False}

        def poll() -> None:
            try:
                # One slot: the single-task claim every API version answers; several: `max=`.
                box["claims"] = self.client.claim_kinds(cfg.kinds, count, wait=cfg.wait, interrupt=self._stopping,
                                                        warm=profile.loaded_adapters(self.backend),
                                                        batch=self._batcher is not None)
            except BaseException as exc:  # handed to the main thread, which decides
                box["error"] = exc
            with guard:
                done.set()
                orphans = box.get("claims", []) if box["abandoned"] else []
            for orphan in orphans:
                self._attempt(orphan).settle(Release("the runner stopped while claiming"))

        threading.Thread(target=poll, name="helix-claim", daemon=True).start()
        while not done.wait(0.05):
            if self._stopping.is_set():
                with guard:
                    box["abandoned"] = not done.is_set()
                if box["abandoned"]:
                    # An idle runner holds nothing, so it exits at once. Should the poll still bring a
                    # task, the helper hands it back; if the process is gone by then, its lease runs out.
                    return []
        if "error" in box:
            raise box["error"]
        claims: list[Claim] = box.get("claims", [])
        if claims and self._stopping.is_set():
            for claim in claims:
                self._attempt(claim).settle(STOPPING)
            return []
        return claims

    # Working.

    def _work(self, claim: Claim, limit: int | None) -> Claim | None:
        """Run one claimed task to its end, then settle that end with the API; the next task, if it came along.

        A completion asks for the next task when the runner goes on and `limit` allows one more
        (reserved here, given back when none came).
        """
        task = claim.task
        logger.info("task %s: claimed (attempt %s, session %s, interaction %s)", task.id, task.attempt,
                    task.session_id, task.interaction_id)
        attempt = self._attempt(claim)
        self._reports[task.id] = attempt.report
        held = metrics.Timer()
        metrics.SLOTS_IN_USE.inc()
        with self._counting:
            self._idle -= 1
        following: Claim | None = None
        try:
            try:
                # A stop() that came between the claim and now hands the task straight back.
                outcome = STOPPING if self._stopping.is_set() else attempt.run()
            finally:
                # Before settling: from here on, a stop() must not cut the task's end short.
                self._reports.pop(task.id, None)
            # Not while a fine-tune waits for the gate: the next chat would only wait with it.
            ask = (isinstance(outcome, Complete) and not self._stopping.is_set()
                   and not (self._gate is not None and self._gate.training) and self._reserve(limit))
            following = attempt.settle(outcome, claim_next=ask)
            if ask and following is None:
                self._unreserve()
        finally:
            metrics.SLOTS_IN_USE.dec()
            with self._counting:
                self._idle += following is None
        metrics.attempt_ended(task.mode, outcome.action, held.elapsed,
                              outcome.result if isinstance(outcome, Complete) else None)
        return following

    def _attempt(self, claim: Claim) -> Attempt:
        """An attempt at a claimed task; with several slots, its events share the batcher's requests."""
        task_id, token = claim.task.id, claim.lease.token
        post = self._batcher.post if self._batcher is not None else self.client.post_events
        report = Report(task_id, functools.partial(post, task_id, token),
                        flush_interval=self.config.flush_interval, batch_size=self.config.batch_size,
                        files=TaskFiles(self.client, task_id, token, Path(self.config.cache_dir)))
        return Attempt(claim, self.backend, self.client, report, describe=self.describe, gate=self._gate)

    def _teardown(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self.client.close()
        logger.info("runner %s: stopped after %d tasks", self.config.runner_name, self.handled)
