"""The runner's one error root and what the loop needs to tell apart."""

from __future__ import annotations

from enum import StrEnum


class RunnerError(Exception):
    """Something went wrong in the runner."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the default message, so each subclass documents itself.
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)


class ApiUnavailable(RunnerError):
    """The API could not be reached or answered 429/5xx, even after retries."""

    def __init__(self, message: str | None = None, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ApiGone(ApiUnavailable):
    """The API stayed unreachable past a stopping runner's grace: nothing more is sent to it.

    The client logs this once; whoever catches it says nothing more, so a runner whose API went
    away first exits with one line. What it held goes back to the queue when its lease runs out.
    """


class ApiError(RunnerError):
    """The API refused a request (a 4xx that retrying will not fix)."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        # No status for one task's answer inside a batched request: its code says it all.
        super().__init__(f"{status} {code}: {message}" if status is not None else f"{code}: {message}")
        self.status = status
        self.code = code
        self.api_message = message


class LeaseLost(ApiError):
    """The lease on this task is stale or expired: another runner may hold the task now."""


class EventsGap(ApiError):
    """The API lacks events before these (it restarted before storing them): resend every unstored one."""


class StopReason(StrEnum):
    """Why a task in hand must stop before its backend finished."""

    CANCELLED = "cancelled"  # the user cancelled it; the API already marked it
    LEASE_LOST = "lease_lost"  # someone else may hold it now; change nothing
    SHUTDOWN = "shutdown"  # this runner is stopping; hand the task back


class TaskCancelled(RunnerError):
    """The task in hand must stop now; raised inside predict() or train() by the report callback."""

    def __init__(self, reason: StopReason = StopReason.CANCELLED, message: str | None = None) -> None:
        super().__init__(message or f"task stopped: {reason}")
        self.reason = reason


class BadTaskInput(RunnerError):
    """The task cannot succeed as given (its input or data is wrong): it fails without a retry."""


class BackendNotFound(RunnerError):
    """No backend by that name or import path."""


def refusal(status: int | None, code: str, message: str) -> ApiError | TaskCancelled:
    """The error an API refusal stands for, by its error code; `status` is None for one task's answer in a batch.

    On the worker endpoints a 409 always means the task is no longer this runner's: cancelled by its
    user, or else the lease is lost.
    """
    if code == "task_cancelled":
        prefix = f"{status} " if status is not None else ""
        return TaskCancelled(StopReason.CANCELLED, f"{prefix}task_cancelled: {message}")
    if code == "events_gap":
        return EventsGap(status, code, message)
    if code == "lease_lost" or status == 409:
        return LeaseLost(status, code or "lease_lost", message)
    return ApiError(status, code or "http_error", message)
