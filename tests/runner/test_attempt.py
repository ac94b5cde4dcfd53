"""One attempt: each way it can end is one outcome, and settling an outcome tells the API just that."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import pytest

from runner.attempt import STOPPING, Attempt, Complete, Drop, Fail, Release, traceback_tail
from runner.backends.base import Backend
from runner.errors import BadTaskInput, StopReason
from runner.messages import Claim, Task
from runner.reporter import Report
from tests.doubles import CrashOnceBackend, EchoBackend

from .conftest import TASK_URL, bodies
from .test_loop import actions, fake_worker_api

pytestmark = pytest.mark.timeout(20)


class Scripted(Backend):
    """predict() runs `script(task, report)`: a backend that ends the way a test needs."""

    def __init__(self, script: Callable[[Task, Report], Any]) -> None:
        super().__init__(None)
        self.script = script

    def predict(self, task: Task, report: Report) -> Any:
        return self.script(task, report)


def attempt_of(api_client, backend: Any, claim_json, **task: Any) -> Attempt:
    claim = Claim.from_json(claim_json(**task))
    post = functools.partial(api_client.post_events, claim.task.id, claim.lease.token)
    return Attempt(claim, backend, api_client, Report(claim.task.id, post, flush_interval=0.01))


def echo(config) -> EchoBackend:
    backend = EchoBackend(config)
    backend.setup()
    return backend


# How an attempt ends.


def test_a_result_completes(api, api_client, config, claim_json):
    fake_worker_api(api)
    outcome = attempt_of(api_client, echo(config), claim_json).run()
    assert isinstance(outcome, Complete)
    assert outcome.result["text"] == "how are you today?" and outcome.elapsed >= 0


def test_a_crash_fails_with_retry_and_the_traceback(api, api_client, config, claim_json):
    fake_worker_api(api)
    backend = CrashOnceBackend(config)
    backend.setup()
    outcome = attempt_of(api_client, backend, claim_json, attempt=1).run()
    assert isinstance(outcome, Fail) and outcome.retry is True
    assert outcome.error.splitlines()[-1] == "RuntimeError: boom: attempt 1 crashed"


def test_bad_task_input_fails_without_retry(api, api_client, claim_json):
    fake_worker_api(api)

    def refuse(task, report):
        raise BadTaskInput("no prompt")

    assert attempt_of(api_client, Scripted(refuse), claim_json).run() == Fail("no prompt", retry=False)


def test_a_result_that_is_no_dict_fails_without_retry(api, api_client, claim_json):
    fake_worker_api(api)
    outcome = attempt_of(api_client, Scripted(lambda task, report: ["text"]), claim_json).run()
    assert outcome == Fail("backend returned list, not a JSON object", retry=False)


def test_cancelled_by_the_user_drops(api, api_client, config, claim_json):
    fake_worker_api(api, heartbeat={"cancelled": True, "lease_expires_at": None})
    attempt = attempt_of(api_client, echo(config), claim_json, params={"sleep": 30},
                         lease={"heartbeat_seconds": 0.01})
    assert attempt.run() == Drop(StopReason.CANCELLED)


def test_a_lost_lease_drops(api, api_client, config, claim_json):
    api.post(re.compile(r".*/heartbeat$"), status=409, json={"error": "lease_lost", "message": "expired"})
    fake_worker_api(api)
    attempt = attempt_of(api_client, echo(config), claim_json, params={"sleep": 30},
                         lease={"heartbeat_seconds": 0.01})
    assert attempt.run() == Drop(StopReason.LEASE_LOST)


def test_a_result_after_the_lease_was_lost_is_dropped(api, api_client, claim_json):
    fake_worker_api(api)

    def ignore_the_loss(task, report):
        report.cancel(StopReason.LEASE_LOST)  # as the heartbeat does; this backend never checks
        return {"text": "late"}

    assert attempt_of(api_client, Scripted(ignore_the_loss), claim_json).run() == Drop(StopReason.LEASE_LOST)


def test_shutdown_releases(api, api_client, claim_json):
    fake_worker_api(api)

    def stopped(task, report):
        report.cancel(StopReason.SHUTDOWN)  # as a stopping runner's grace timer does
        report.check()

    assert attempt_of(api_client, Scripted(stopped), claim_json).run() == STOPPING


def test_a_crash_while_stopping_is_the_stop_not_a_failure(api, api_client, claim_json):
    fake_worker_api(api)

    def trip(task, report):
        report.cancel(StopReason.SHUTDOWN)
        raise RuntimeError("the backend tripped over its own cancellation")

    assert attempt_of(api_client, Scripted(trip), claim_json).run() == STOPPING


def test_a_result_inside_the_grace_period_completes(api, api_client, claim_json):
    fake_worker_api(api)

    def finish_anyway(task, report):
        report.cancel(StopReason.SHUTDOWN)
        return {"text": "done"}

    outcome = attempt_of(api_client, Scripted(finish_anyway), claim_json).run()
    assert isinstance(outcome, Complete) and outcome.result == {"text": "done"}


def test_a_finetune_calls_train_and_anything_else_predict(api, api_client, claim_json):
    class Both(Scripted):
        def train(self, task, report):
            return {"trained": task.id}

    fake_worker_api(api)
    backend = Both(lambda task, report: {"predicted": task.id})
    assert attempt_of(api_client, backend, claim_json, mode="finetune").run().result == {"trained": 42}
    assert attempt_of(api_client, backend, claim_json, mode="create").run().result == {"predicted": 42}


def test_a_backend_that_cannot_train_fails_a_finetune_without_retry(api, api_client, claim_json):
    fake_worker_api(api)
    outcome = attempt_of(api_client, Scripted(lambda task, report: {"text": "x"}), claim_json, mode="finetune").run()
    assert outcome == Fail("the Scripted backend does not fine-tune", retry=False)


# Settling: what the API is told.


def test_settling_a_completion_sends_the_result_with_the_last_events(api, api_client, config, claim_json):
    fake_worker_api(api)
    attempt = attempt_of(api_client, echo(config), claim_json)
    attempt.report.token("hi")  # not posted yet: it rides with the result
    attempt.settle(Complete({"text": "hi"}, 0.1))
    (complete,) = bodies(api, "/42/complete")
    assert complete == {"lease_token": "l_42", "result": {"text": "hi"},
                        "events": [{"kind": "token", "text": "hi", "seq": 1}]}


def test_a_refused_result_fails_without_retry(api, api_client, config, claim_json):
    api.post(f"{TASK_URL}/42/complete", status=400, json={"error": "invalid_field", "message": "result.text"})
    fake_worker_api(api)
    attempt_of(api_client, echo(config), claim_json).settle(Complete({"text": 1}, 0.1))
    (fail,) = bodies(api, "/42/fail")
    assert fail == {"lease_token": "l_42", "error": "the API refused the result: result.text", "retry": False}


def test_settling_a_failure_posts_the_events_first(api, api_client, config, claim_json):
    fake_worker_api(api)
    attempt = attempt_of(api_client, echo(config), claim_json)
    attempt.report.token("partial")
    attempt.settle(Fail("boom", retry=True))
    assert actions(api) == ["42/events", "42/fail"]
    assert bodies(api, "/42/fail") == [{"lease_token": "l_42", "error": "boom", "retry": True}]


def test_settling_a_release_hands_back_and_drops_unsent_events(api, api_client, config, claim_json):
    fake_worker_api(api)
    attempt = attempt_of(api_client, echo(config), claim_json)
    attempt.report.token("lost")
    attempt.settle(Release("the runner is stopping"))
    assert actions(api) == ["42/release"]


def test_settling_a_drop_tells_the_api_nothing(api, api_client, config, claim_json):
    fake_worker_api(api)
    attempt = attempt_of(api_client, echo(config), claim_json)
    attempt.report.token("lost")
    attempt.settle(Drop(StopReason.CANCELLED))
    assert len(api.calls) == 0


@pytest.mark.parametrize("refusal", [
    {"status": 409, "json": {"error": "lease_lost", "message": "expired"}},
    {"status": 409, "json": {"error": "task_cancelled", "message": "cancelled"}},
    {"status": 503},
])
def test_a_refusal_while_settling_is_logged_not_raised(api, api_client, config, claim_json, refusal):
    for action in ("complete", "fail", "release"):
        api.post(f"{TASK_URL}/42/{action}", **refusal)
    fake_worker_api(api)
    for outcome in (Complete({"text": "x"}, 0.1), Fail("boom", retry=True), Release("stopping")):
        attempt_of(api_client, echo(config), claim_json).settle(outcome)  # returns, whatever the API said
    # Fail and release were sent alike; a complete refused this way did not turn into a fail.
    assert len(bodies(api, "/42/fail")) == len(bodies(api, "/42/release")) >= 1


def test_traceback_tail_keeps_the_last_lines():
    def deep(n: int) -> None:
        if n == 0:
            raise ValueError("bottom")
        deep(n - 1)

    try:
        deep(30)
    except ValueError as exc:
        tail = traceback_tail(exc, lines=5)
    assert len(tail.splitlines()) == 5
    assert tail.splitlines()[-1] == "ValueError: bottom"
