"""The main loop against a fake API: claim, stream, finish; crashes, cancels, lost leases, shutdown."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
import requests
import responses

from runner.client import ApiClient
from runner.config import RetryPolicy
from runner.errors import ApiError, BadTaskInput
from runner.loop import Runner
from tests.doubles import CrashOnceBackend, EchoBackend, StubbornBackend

from .conftest import API, TASK_URL, bodies, posted_events

pytestmark = pytest.mark.timeout(20)

def fake_worker_api(api, *, heartbeat: dict[str, Any] | None = None) -> None:
    """Accept every worker call; the heartbeat replies with `heartbeat`."""
    api.post(re.compile(r".*/heartbeat$"), json=heartbeat or {"cancelled": False, "lease_expires_at": "x"})
    api.add_callback(responses.POST, re.compile(r".*/worker/events$"), callback=_answer_posts)
    api.post(re.compile(r".*/events$"), json={"stored": 1, "last_seq": 1, "cancelled": False})
    api.post(re.compile(r".*/complete$"), json={"status": "complete"})
    api.post(re.compile(r".*/fail$"), json={"status": "queued"})
    api.post(re.compile(r".*/release$"), json={"status": "queued"})
    api.post(re.compile(r".*/worker/runners$"), json={"name": "test-runner"})


def _answer_posts(request) -> tuple[int, dict[str, str], str]:
    """The batched events endpoint: every post stored."""
    posts = json.loads(request.body)["posts"]
    results = [{"task_id": p["task_id"], "stored": len(p["events"]), "last_seq": p["events"][-1]["seq"],
                "cancelled": False} for p in posts]
    return 200, {}, json.dumps({"results": results})


def actions(api) -> list[str]:
    """What the runner asked, in order, with runs of events/heartbeats collapsed (and its profile left out)."""
    seen: list[str] = []
    for call in api.calls:
        url = call.request.url
        name = "claim" if "/task?" in url or url.endswith("/task") else "/".join(url.rsplit("/", 2)[-2:])
        collapsed = seen and seen[-1] == name and name.endswith("/events")
        if name.endswith("/heartbeat") or name == "worker/runners" or collapsed:
            continue
        seen.append(name)
    return seen


class StartedEcho(EchoBackend):
    """An echo backend that says when predict() has started."""

    def __init__(self, config=None):
        super().__init__(config)
        self.started = threading.Event()

    def predict(self, task, report):
        self.started.set()
        return super().predict(task, report)


def stop_when_started(runner: Runner, backend: StartedEcho, times: int = 1) -> threading.Thread:
    def stop() -> None:
        assert backend.started.wait(10)
        for _ in range(times):
            runner.stop()

    thread = threading.Thread(target=stop)
    thread.start()
    return thread


def test_claim_stream_complete(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(params={"token_delay": 0.002}))
    fake_worker_api(api)
    backend = EchoBackend(config)
    assert Runner(config, backend, api_client).run(max_tasks=1) == 1

    done = actions(api)
    assert done[0] == "claim" and done[-1] == "42/complete" and set(done[1:-1]) <= {"42/events"}
    events = posted_events(api)
    tokens = [event for event in events if event["kind"] == "token"]
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert [event["text"] for event in tokens] == ["how ", "are ", "you ", "today?"]
    (complete,) = bodies(api, "/42/complete")
    assert complete["lease_token"] == "l_42"
    assert complete["result"]["text"] == "".join(event["text"] for event in tokens) == "how are you today?"


def test_the_last_events_ride_with_the_result(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json())
    fake_worker_api(api)
    slow = replace(config, flush_interval=60.0)  # nothing is posted before the task ends
    assert Runner(slow, EchoBackend(slow), api_client).run(max_tasks=1) == 1
    assert actions(api) == ["claim", "42/complete"]
    (complete,) = bodies(api, "/42/complete")
    assert [e["text"] for e in complete["events"] if e["kind"] == "token"] == ["how ", "are ", "you ", "today?"]


def test_events_the_api_refuses_do_not_cost_the_result(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json())
    api.post(f"{API}/api/v1/worker/task/42/heartbeat", json={"cancelled": False})
    api.post(f"{API}/api/v1/worker/task/42/complete", status=400,
             json={"error": "invalid_field", "message": "events[0] is bad"})
    api.post(f"{API}/api/v1/worker/task/42/complete", json={"status": "complete"})
    slow = replace(config, flush_interval=60.0)
    assert Runner(slow, EchoBackend(slow), api_client).run(max_tasks=1) == 1
    first, second = bodies(api, "/42/complete")
    assert first["events"] and "events" not in second
    assert second["result"]["text"] == "how are you today?"
    assert not bodies(api, "/42/fail")


def test_setup_runs_once_for_many_tasks(api, api_client, config, claim_json):
    class Counted(EchoBackend):
        setup_calls = 0

    api.get(TASK_URL, json=claim_json(task_id=1))
    api.get(TASK_URL, json=claim_json(task_id=2))
    fake_worker_api(api)
    assert Runner(config, Counted(config), api_client).run(max_tasks=2) == 2
    assert Counted.setup_calls == 1
    assert [body["result"]["setup_calls"] for body in bodies(api, "/complete")] == [1, 1]


def test_a_finetune_task_is_trained_not_predicted(api, api_client, config, claim_json):
    class Trains(EchoBackend):
        def train(self, task, report):
            report.progress(1, 1, message="training")
            return {"text": "trained"}

    api.get(TASK_URL, json=claim_json(mode="finetune"))
    fake_worker_api(api)
    finetune = replace(config, mode="finetune")
    assert Runner(finetune, Trains(finetune), api_client).run(max_tasks=1) == 1
    (complete,) = bodies(api, "/42/complete")
    assert complete["result"] == {"text": "trained"}
    assert [e["message"] for e in posted_events(api)] == ["training"]


def test_crash_fails_with_retry_and_traceback_then_carries_on(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1, attempt=1))
    api.get(TASK_URL, json=claim_json(task_id=2, attempt=2))
    fake_worker_api(api)
    assert Runner(config, CrashOnceBackend(config), api_client).run(max_tasks=2) == 2

    (fail,) = bodies(api, "/1/fail")
    assert fail["retry"] is True and fail["lease_token"] == "l_1"
    assert fail["error"].splitlines()[-1] == "RuntimeError: boom: attempt 1 crashed"
    assert "in predict" in fail["error"]
    assert bodies(api, "/2/complete")[0]["result"]["text"] == "how are you today?"


def test_bad_task_input_fails_for_good_with_its_message(api, api_client, config, claim_json):
    class Refuses(EchoBackend):
        def predict(self, task, report):
            raise BadTaskInput("bad training data: train.jsonl line 3: no assistant message")

    api.get(TASK_URL, json=claim_json())
    fake_worker_api(api)
    assert Runner(config, Refuses(config), api_client).run(max_tasks=1) == 1
    (fail,) = bodies(api, "/42/fail")
    assert fail["retry"] is False
    assert fail["error"] == "bad training data: train.jsonl line 3: no assistant message"


def test_non_dict_result_fails_for_good(api, api_client, config, claim_json):
    class NoResult(EchoBackend):
        def predict(self, task, report):
            return None

    api.get(TASK_URL, json=claim_json())
    fake_worker_api(api)
    Runner(config, NoResult(config), api_client).run(max_tasks=1)
    (fail,) = bodies(api, "/42/fail")
    assert fail["retry"] is False and "NoneType" in fail["error"]


def test_cancelled_heartbeat_stops_predict_and_posts_nothing_more(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(params={"sleep": 30}, lease={"heartbeat_seconds": 0.01}))
    fake_worker_api(api, heartbeat={"cancelled": True, "lease_expires_at": None})
    started = time.monotonic()
    Runner(config, EchoBackend(config), api_client).run(max_tasks=1)
    assert time.monotonic() - started < 10  # not the 30 s the task would take
    assert actions(api) == ["claim"]  # no events, no complete, no fail, no release
    assert bodies(api, "/42/heartbeat")


def test_lease_lost_on_events_drops_the_task_and_carries_on(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1, params={"token_delay": 0.05}))
    api.get(TASK_URL, json=claim_json(task_id=2))
    api.post(f"{TASK_URL}/1/events", status=409, json={"error": "lease_lost", "message": "expired"})
    fake_worker_api(api)
    Runner(config, EchoBackend(config), api_client).run(max_tasks=2)
    assert not bodies(api, "/1/complete") and not bodies(api, "/1/fail")
    assert len(bodies(api, "/1/events")) == 1  # not resent: nothing can be stored any more
    assert bodies(api, "/2/complete")


def test_stop_past_grace_releases_the_task(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(params={"sleep": 30}))
    fake_worker_api(api)
    backend = StartedEcho(config)
    runner = Runner(replace(config, grace_seconds=0.1), backend, api_client)
    stopper = stop_when_started(runner, backend)
    assert runner.run() == 1  # returns, though no max_tasks
    stopper.join()
    assert actions(api) == ["claim", "42/release"]
    assert bodies(api, "/42/release") == [{"lease_token": "l_42"}]


def test_second_stop_releases_at_once(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(params={"sleep": 30}))
    fake_worker_api(api)
    backend = StartedEcho(config)
    runner = Runner(replace(config, grace_seconds=60), backend, api_client)
    stopper = stop_when_started(runner, backend, times=2)
    runner.run()
    stopper.join()
    assert actions(api) == ["claim", "42/release"]


def test_stop_within_grace_lets_the_task_finish(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(params={"token_delay": 0.02}))
    api.get(TASK_URL, json=claim_json(task_id=2))
    fake_worker_api(api)
    backend = StartedEcho(config)
    runner = Runner(replace(config, grace_seconds=10), backend, api_client)
    stopper = stop_when_started(runner, backend)
    assert runner.run() == 1
    stopper.join()
    assert actions(api) == ["claim", "42/events", "42/complete"]  # and no second claim


def test_backend_ignoring_shutdown_still_completes(api, api_client, config, claim_json):
    class Slow(StubbornBackend):
        started = threading.Event()

        def predict(self, task, report):
            self.started.set()
            return super().predict(task, report)

    api.get(TASK_URL, json=claim_json(params={"sleep": 0.3}))
    fake_worker_api(api)
    backend = Slow(config)
    runner = Runner(replace(config, grace_seconds=0.01), backend, api_client)
    stopper = stop_when_started(runner, backend)
    runner.run()
    stopper.join()
    assert actions(api) == ["claim", "42/complete"]


def test_stop_during_a_long_poll_returns_at_once_and_hands_back_a_late_claim(api, api_client, config,
                                                                              claim_json):
    polling, answer = threading.Event(), threading.Event()

    def slow_claim(request):
        polling.set()
        answer.wait(10)  # the long poll is in flight until the runner has stopped
        return 200, {}, json.dumps(claim_json())

    api.add_callback("GET", TASK_URL, callback=slow_claim)
    fake_worker_api(api)
    runner = Runner(replace(config, grace_seconds=60), EchoBackend(config), api_client)
    threading.Thread(target=lambda: polling.wait(10) and runner.stop()).start()
    assert runner.run() == 0  # did not wait for the poll
    answer.set()
    deadline = time.monotonic() + 10
    while "42/release" not in actions(api) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert actions(api) == ["claim", "42/release"]


def test_transient_claim_failures_never_kill_the_loop(api, api_client, config, claim_json):
    for _ in range(4):
        api.get(TASK_URL, status=503)
    for _ in range(3):
        api.get(TASK_URL, body=requests.ConnectionError("refused"))
    api.get(TASK_URL, status=429)
    api.get(TASK_URL, json=claim_json())
    fake_worker_api(api)
    assert Runner(config, EchoBackend(config), api_client).run(max_tasks=1) == 1
    assert bodies(api, "/42/complete")


def test_claim_refused_for_good_ends_run_with_the_api_message(api, api_client, config):
    api.get(TASK_URL, status=401, json={"error": "unauthorized", "message": "unknown runner token"})
    with pytest.raises(ApiError, match="unknown runner token"):
        Runner(config, EchoBackend(config), api_client).run()
    assert [call.request.method for call in api.calls] == ["POST", "GET"]  # its profile, then one claim


def test_idle_runner_stops_promptly(api, api_client, config):
    api.get(TASK_URL, status=204)
    runner = Runner(config, EchoBackend(config), api_client)
    timer = threading.Timer(0.1, runner.stop)
    timer.start()
    assert runner.run() == 0
    assert len(api.calls) >= 1



def test_a_complete_brings_the_next_task_without_a_claim(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1))
    api.post(f"{TASK_URL}/1/complete", json={"status": "complete", "next": claim_json(task_id=2)})
    api.post(f"{TASK_URL}/2/complete", json={"status": "complete", "next": None})
    fake_worker_api(api)
    assert Runner(config, EchoBackend(config), api_client).run(max_tasks=2) == 2
    assert actions(api) == ["claim", "1/complete", "2/complete"]
    # It asks for the next task only while max_tasks leaves room for one.
    assert [body.get("claim_next") for body in bodies(api, "/complete")] == [True, None]


def test_a_next_task_that_arrives_as_the_runner_stops_goes_back(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1))
    backend = EchoBackend(config)
    runner = Runner(config, backend, api_client)

    def complete_then_stop(request):
        runner.stop()
        return 200, {}, json.dumps({"status": "complete", "next": claim_json(task_id=2)})

    api.add_callback(responses.POST, f"{TASK_URL}/1/complete", callback=complete_then_stop)
    fake_worker_api(api)
    assert runner.run() == 1
    assert actions(api) == ["claim", "1/complete", "2/release"]


def test_an_api_without_claim_next_is_completed_the_old_way(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1))
    api.post(f"{TASK_URL}/1/complete", status=400,
             json={"error": "invalid_field", "message": "Unknown field 'claim_next'; allowed: ..."})
    api.post(f"{TASK_URL}/1/complete", json={"status": "complete"})
    api.get(TASK_URL, json=claim_json(task_id=2))
    fake_worker_api(api)
    assert Runner(config, EchoBackend(config), api_client).run(max_tasks=2) == 2
    first, second = bodies(api, "/1/complete")
    assert first["claim_next"] is True and "claim_next" not in second
    assert not bodies(api, "/1/fail")


def test_a_stopping_runner_whose_api_is_gone_exits_after_its_api_grace_with_one_line(api, config, claim_json,
                                                                                     caplog):
    # The claim is answered; then the API goes away: every later call is refused a connection. The
    # reply streams (20 s of tokens) as a chat does, so its event posts are what find the API gone.
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}]}
    api.post(re.compile(r".*/worker/runners$"), json={"name": "test-runner"})  # its profile, taken at start
    api.get(TASK_URL, json=claim_json(input=long_prompt, params={"token_delay": 0.05}))
    patient = RetryPolicy(attempts=1000, max_delay=60.0, initial=0.05, cap=0.2)  # would retry for a minute
    client = ApiClient(API, "hxr_test", "test-runner", timeout=2.0, retry=patient)
    backend = StartedEcho(config)
    runner = Runner(replace(config, grace_seconds=30, api_grace_seconds=0.3, retry=patient), backend, client)
    stopper = stop_when_started(runner, backend)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert runner.run() == 1
    stopper.join()
    assert time.monotonic() - started < 5  # not the task's 30 s grace, nor a minute of retries
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "unreachable" in said[0], said


def test_the_runner_reports_its_profile_at_start_and_in_heartbeats(api, api_client, config, claim_json):
    from dataclasses import replace

    import runner

    api.get(TASK_URL, json=claim_json(params={"sleep": 0.3}, lease={"heartbeat_seconds": 0.05}))
    fake_worker_api(api)
    config = replace(config, max_parallel=3)
    assert Runner(config, EchoBackend(config), api_client).run(max_tasks=1) == 1
    (profile,) = bodies(api, "/worker/runners")
    assert profile["kinds"] == [{"mode": "create", "type": "text", "model_name": config.model_name}]
    assert profile["backend"] == "tests.doubles:EchoBackend" and profile["version"] == runner.__version__
    assert profile["slots"] == {"total": 3, "busy": 0} and profile["adapters"] == []
    assert profile["hardware"]["cpu"]["cores"] >= 1 and isinstance(profile["hardware"]["gpus"], list)
    beats = bodies(api, "/42/heartbeat")
    assert beats and all(beat["runner"]["slots"] == {"total": 3, "busy": 1} for beat in beats)


def test_a_profile_the_api_could_not_take_yet_is_sent_again_before_the_next_claim(api, api_client, config):
    import requests

    api.post(re.compile(r".*/worker/runners$"), body=requests.ConnectionError("refused"))
    api.post(re.compile(r".*/worker/runners$"), json={"stored": True})
    api.get(TASK_URL, status=204)
    runner = Runner(config, EchoBackend(config), api_client)
    timer = threading.Timer(0.3, runner.stop)
    timer.start()
    runner.run()
    methods = [call.request.method for call in api.calls]
    assert methods[:4] == ["POST", "GET", "POST", "GET"]  # one try each, never holding a claim back
    assert methods.count("POST") == 2  # taken on the second try: not sent again


def test_a_runner_whose_api_has_no_profile_endpoint_serves_all_the_same(api, api_client, config, claim_json):
    api.post(re.compile(r".*/worker/runners$"), status=404, json={"error": "not_found", "message": "no"})
    api.get(TASK_URL, json=claim_json())
    fake_worker_api(api)
    assert Runner(config, EchoBackend(config), api_client).run(max_tasks=1) == 1
    assert bodies(api, "/42/complete")


def test_auto_holds_a_backend_that_cannot_size_its_slots_to_one(api_client, config):
    from dataclasses import replace

    assert EchoBackend.max_parallel > 1 and not EchoBackend.sizes_slots
    auto = replace(config, parallel_auto=True, max_parallel=64)
    assert Runner(auto, EchoBackend(auto), api_client).slots() == 1
