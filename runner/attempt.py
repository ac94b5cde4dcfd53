"""One attempt at a claimed task: run it once, name how it ended (the outcome), settle that with the API."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from runner.errors import ApiError, ApiGone, ApiUnavailable, BadTaskInput, LeaseLost, StopReason, TaskCancelled
from runner.heartbeat import Heartbeat
from runner.messages import FINETUNE

if TYPE_CHECKING:
    from runner.backends.base import Backend
    from runner.client import ApiClient
    from runner.gate import SlotGate
    from runner.messages import Claim
    from runner.reporter import Report

logger = logging.getLogger(__name__)

CARRY_EVENTS = 256  # unsent events that go with the result; older ones are posted first
TRACEBACK_LINES = 20  # enough to see where it broke, small enough for the reply's error field
# The API must hear nothing more of a task its user cancelled (it knows) or whose lease is lost (not ours).
DROPPED = (StopReason.CANCELLED, StopReason.LEASE_LOST)


def traceback_tail(exc: BaseException, lines: int = TRACEBACK_LINES) -> str:
    """The last lines of an exception's traceback, ending with the exception itself."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    return "\n".join(text.splitlines()[-lines:])


# Outcomes: how an attempt ended, and so what the API is told.


@dataclass(frozen=True)
class Complete:
    """The backend returned a result: store it."""

    action: ClassVar[str] = "complete"
    result: dict[str, Any]
    elapsed: float


@dataclass(frozen=True)
class Fail:
    """The attempt failed; with `retry` the API requeues the task while it has attempts left."""

    action: ClassVar[str] = "fail"
    error: str
    retry: bool


@dataclass(frozen=True)
class Release:
    """Hand the task back to the queue (this runner is stopping); the next attempt starts afresh."""

    action: ClassVar[str] = "release"
    why: str


@dataclass(frozen=True)
class Drop:
    """Tell the API nothing: the user cancelled the task, or the lease is lost (`why` says which)."""

    action: ClassVar[str] = "drop"
    why: StopReason


Outcome = Complete | Fail | Release | Drop

STOPPING = Release("the runner is stopping")


def _stopped(reason: StopReason) -> Outcome:
    """The outcome of a task stopped before its end: dropped, or handed back by a stopping runner."""
    return Drop(reason) if reason in DROPPED else STOPPING


class Attempt:
    """One claimed task, run once: run() returns how it ended, settle() is where every attempt ends."""

    def __init__(self, claim: Claim, backend: Backend, client: ApiClient, report: Report,
                 describe: Callable[[], dict[str, Any]] | None = None, gate: SlotGate | None = None) -> None:
        self.task = claim.task
        self.lease = claim.lease
        self.report = report
        self._backend = backend
        self._client = client
        self._gate = gate  # a runner of both inference and fine-tuning with several slots: train() runs alone
        self._call = "train()" if claim.task.mode == FINETUNE else "predict()"  # for the logs
        # Each renewal carries the runner's profile (`describe`), so the API hears it without a request of its own.
        self._heartbeat = Heartbeat(client, claim.task.id, claim.lease, on_stop=report.cancel, describe=describe)

    def run(self) -> Outcome:
        """Run the backend on the task, its lease kept alive meanwhile; how the attempt ended."""
        task, report = self.task, self.report
        report.start()
        self._heartbeat.start()
        started = time.monotonic()
        try:
            try:
                result = self._call_backend()
            finally:
                # Before settling: a renewal in flight must not race the task's end.
                self._heartbeat.stop()
        except TaskCancelled as exc:
            return _stopped(report.stop_reason or exc.reason)
        except Exception as exc:
            if report.stop_reason is not None:
                # Most likely the backend tripping over its own cancellation: not a crash of the task.
                logger.info("task %s: %s raised %r while stopping", task.id, self._call, exc)
                return _stopped(report.stop_reason)
            if isinstance(exc, BadTaskInput):
                logger.error("task %s: cannot be done as given: %s", task.id, exc)
                return Fail(str(exc), retry=False)
            logger.exception("task %s: %s failed", task.id, self._call)
            return Fail(traceback_tail(exc), retry=True)
        if report.stop_reason in DROPPED:
            return Drop(report.stop_reason)
        if not isinstance(result, dict):
            logger.error("task %s: %s returned %s, not a dict", task.id, self._call, type(result).__name__)
            return Fail(f"backend returned {type(result).__name__}, not a JSON object", retry=False)
        # A task that finished inside the grace period (or despite it) is worth keeping.
        return Complete(result, time.monotonic() - started)

    def _call_backend(self) -> Any:
        """train() for a fine-tune, predict() for every other task (through the slots' gate, if any)."""
        training = self.task.mode == FINETUNE
        call = self._backend.train if training else self._backend.predict
        if self._gate is None:
            return call(self.task, self.report)
        with self._gate.alone() if training else self._gate.shared():
            self.report.check()  # cancelled, or the runner stopped, while it waited for the gate
            return call(self.task, self.report)

    def settle(self, outcome: Outcome, claim_next: bool = False) -> Claim | None:
        """End the attempt: close its report as the outcome needs, then tell the API (nothing, for a drop).

        With `claim_next`, a `complete` also claims the runner's next task, which is returned (None
        when there was none, or the outcome was not a completion). Never raises for what the API
        answers: the loop goes on to the next task, and an attempt the API never hears about goes back
        to the queue when its lease runs out.
        """
        carried: list[dict[str, Any]] = []
        if isinstance(outcome, Complete):
            # The last events ride with the result: one round trip at the end of every task, not two.
            unsent = self.report.close_for_result(carry=CARRY_EVENTS)
            if unsent is not None:
                carried = unsent
            elif self.report.stop_reason in DROPPED:
                outcome = Drop(self.report.stop_reason)  # found out while posting the older events
            else:
                logger.warning("task %s: completing with some events unsent", self.task.id)
        if isinstance(outcome, Fail):
            self.report.close(flush=True)  # the tokens streamed so far help whoever reads the error
        elif isinstance(outcome, Release | Drop):
            # Nothing more can be stored once cancelled or lost, and a released attempt starts afresh.
            self.report.close(flush=False)
        return self._tell(outcome, carried, claim_next)

    def _tell(self, outcome: Outcome, carried: list[dict[str, Any]], claim_next: bool = False) -> Claim | None:
        """Send the outcome to the API, logging whatever goes wrong; the next task a completion claimed."""
        task_id, token = self.task.id, self.lease.token
        try:
            match outcome:
                case Complete(result=result, elapsed=elapsed):
                    claimed = self._complete(result, carried, claim_next)
                    logger.info("task %s: complete in %.2fs (%d events)", task_id, elapsed, self.report.last_seq)
                    return claimed
                case Fail(error=error, retry=retry):
                    reply = self._client.fail(task_id, token, error, retry)
                    logger.info("task %s: fail -> %s", task_id, reply.get("status", "ok"))
                case Release(why=why):
                    logger.info("task %s: handing back: %s", task_id, why)
                    reply = self._client.release(task_id, token)
                    logger.info("task %s: release -> %s", task_id, reply.get("status", "ok"))
                case Drop(why=StopReason.CANCELLED):
                    logger.info("task %s: cancelled by the user", task_id)
                case Drop():
                    logger.warning("task %s: lease lost; dropped", task_id)
        except LeaseLost:
            logger.warning("task %s: lease lost before %s", task_id, outcome.action)
        except TaskCancelled:
            logger.info("task %s: cancelled by the user before %s", task_id, outcome.action)
        except ApiGone:
            pass  # the client said so once, for the whole runner
        except ApiUnavailable:
            # The lease runs out and the API requeues the task: nothing is lost but time.
            logger.exception("task %s: %s not sent, API unavailable", task_id, outcome.action)
        except ApiError as exc:
            if not isinstance(outcome, Complete):
                logger.exception("task %s: %s refused", task_id, outcome.action)
                return None
            # A result the API will never take would only be refused again: fail the task for good.
            logger.error("task %s: result refused: %s", task_id, exc)
            self._tell(Fail(f"the API refused the result: {exc.api_message}", retry=False), [])
        return None

    def _complete(self, result: dict[str, Any], carried: list[dict[str, Any]], claim_next: bool) -> Claim | None:
        try:
            claimed = self._client.complete(self.task.id, self.lease.token, result, carried, claim_next=claim_next)
        except ApiError as exc:
            if claim_next and exc.code == "invalid_field" and "claim_next" in exc.api_message:
                # An API from before `claim_next` refuses the field: complete as it expects.
                return self._complete(result, carried, claim_next=False)
            if not carried or isinstance(exc, LeaseLost):
                raise
            # Events the API will never take (as a post would have been) must not cost the result.
            logger.exception("task %s: events %d-%d refused with the result; completing without them",
                             self.task.id, carried[0]["seq"], carried[-1]["seq"])
            claimed = self._client.complete(self.task.id, self.lease.token, result, claim_next=claim_next)
        return claimed
