"""The main loop with --max-parallel N: N tasks held and predicted at once; stop() handles every one."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from runner.loop import Runner
from tests.doubles import EchoBackend

from .conftest import TASK_URL, bodies, posted_events
from .test_loop import actions, fake_worker_api

pytestmark = pytest.mark.timeout(30)


class Meeting(EchoBackend):
    """predict() waits until `size` predicts run at once (a runner holding one task at a time never gets there)."""

    def __init__(self, config=None, size: int = 2):
        super().__init__(config)
        self.barrier = threading.Barrier(size, timeout=10)
        self.most = 0
        self._running = 0
        self._lock = threading.Lock()

    def predict(self, task, report):
        with self._lock:
            self._running += 1
            self.most = max(self.most, self._running)
        try:
            self.barrier.wait()
            return super().predict(task, report)
        finally:
            with self._lock:
                self._running -= 1


def test_two_slots_hold_and_predict_two_tasks_at_once(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1))
    api.get(TASK_URL, json=claim_json(task_id=2))
    api.get(TASK_URL, status=204)
    fake_worker_api(api)
    backend = Meeting(config, size=2)
    assert Runner(replace(config, max_parallel=2), backend, api_client).run(max_tasks=2) == 2
    assert backend.most == 2
    assert {body["lease_token"] for body in bodies(api, "/complete")} == {"l_1", "l_2"}


def test_slots_stream_through_the_shared_events_request(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1, params={"token_delay": 0.02}))
    api.get(TASK_URL, json=claim_json(task_id=2, params={"token_delay": 0.02}))
    api.get(TASK_URL, status=204)
    fake_worker_api(api)
    backend = Meeting(config, size=2)
    assert Runner(replace(config, max_parallel=2), backend, api_client).run(max_tasks=2) == 2
    assert not any(call.request.url.endswith(("/1/events", "/2/events")) for call in api.calls)
    assert any(call.request.url.endswith("/worker/events") for call in api.calls)
    for task_id in (1, 2):
        events = posted_events(api, task_id)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert "".join(e["text"] for e in events if e["kind"] == "token") == "how are you today?"


def test_max_tasks_counts_every_slot(api, api_client, config, claim_json):
    for task_id in range(1, 6):
        api.get(TASK_URL, json=claim_json(task_id=task_id))
    fake_worker_api(api)
    assert Runner(replace(config, max_parallel=3), EchoBackend(config), api_client).run(max_tasks=4) == 4
    assert len(bodies(api, "/complete")) == 4
    assert actions(api).count("claim") == 4


def test_stop_hands_back_every_task_in_hand(api, api_client, config, claim_json):
    api.get(TASK_URL, json=claim_json(task_id=1, params={"sleep": 30}))
    api.get(TASK_URL, json=claim_json(task_id=2, params={"sleep": 30}))
    api.get(TASK_URL, status=204)
    fake_worker_api(api)

    class Started(EchoBackend):
        both = threading.Barrier(3, timeout=10)

        def predict(self, task, report):
            self.both.wait()
            return super().predict(task, report)

    runner = Runner(replace(config, max_parallel=2, grace_seconds=0.1), Started(config), api_client)
    stopper = threading.Thread(target=lambda: (Started.both.wait(), runner.stop()))
    stopper.start()
    assert runner.run() == 2
    stopper.join()
    assert sorted(body["lease_token"] for body in bodies(api, "/release")) == ["l_1", "l_2"]
    assert not bodies(api, "/complete")


def test_a_backend_can_cap_the_slots(api, api_client, config, claim_json):
    class OneAtATime(EchoBackend):
        max_parallel = 1

    runner = Runner(replace(config, max_parallel=8), OneAtATime(config), api_client)
    assert runner.slots() == 1
    assert Runner(replace(config, max_parallel=8), EchoBackend(config), api_client).slots() == 8


def test_the_config_caps_the_backend(api_client, config):
    assert EchoBackend.max_parallel > 2
    assert Runner(replace(config, max_parallel=2), EchoBackend(config), api_client).slots() == 2


def test_a_backend_that_declares_nothing_holds_one_task(api_client, config):
    class Undeclared:  # duck-typed: no max_parallel
        def setup(self) -> None:
            pass

    assert Runner(replace(config, max_parallel=8), Undeclared(), api_client).slots() == 1


def test_a_claim_refused_for_good_stops_every_slot_and_is_raised(api, api_client, config):
    api.get(TASK_URL, status=401, json={"error": "unauthorized", "message": "unknown runner token"})
    from runner.errors import ApiError

    with pytest.raises(ApiError, match="unknown runner token"):
        Runner(replace(config, max_parallel=3), EchoBackend(config), api_client).run()


def test_one_poll_claims_for_every_idle_slot(api, api_client, config, claim_json):
    api.get(TASK_URL, json={"tasks": [claim_json(task_id=1), claim_json(task_id=2)]})
    api.get(TASK_URL, status=204)
    fake_worker_api(api)
    backend = Meeting(config, size=2)
    assert Runner(replace(config, max_parallel=2), backend, api_client).run(max_tasks=2) == 2
    assert backend.most == 2
    claims = [call.request for call in api.calls if "/task?" in call.request.url]
    assert len(claims) == 1 and "max=2" in claims[0].url


class Overlaps(EchoBackend):
    """Counts the times a train() ran beside a predict() (the runner's gate must prevent it)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.running = {"predict": 0, "train": 0}
        self.overlaps = 0
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def _call(self, what: str, run):
        with self._lock:
            self.running[what] += 1
            self.calls.append(what)
            self.overlaps += self.running["train"] > 0 and sum(self.running.values()) > 1
        try:
            time.sleep(0.1)
            return run()
        finally:
            with self._lock:
                self.running[what] -= 1

    def predict(self, task, report):
        return self._call("predict", lambda: super(Overlaps, self).predict(task, report))

    def train(self, task, report):
        return self._call("train", lambda: super(Overlaps, self).train(task, report))


def test_a_runner_of_both_kinds_runs_a_fine_tune_alone_and_chats_together(api, api_client, config, claim_json):
    from runner.config import Kind

    api.get(TASK_URL, json={"tasks": [claim_json(task_id=1), claim_json(task_id=2, mode="finetune"),
                                      claim_json(task_id=3)]})
    api.get(TASK_URL, status=204)
    fake_worker_api(api)
    config = replace(config, max_parallel=3,
                     more_kinds=(Kind("finetune", "text", "mistralai/Mistral-7B-Instruct-v0.1"),))
    backend = Overlaps(config)
    assert Runner(config, backend, api_client).run(max_tasks=3) == 3
    assert sorted(backend.calls) == ["predict", "predict", "train"] and backend.overlaps == 0
    assert {body["lease_token"] for body in bodies(api, "/complete")} == {"l_1", "l_2", "l_3"}
    claim = next(call.request for call in api.calls if "/worker/task?" in call.request.url)
    assert "kind=finetune%3Atext%3A" in claim.url and "max=3" in claim.url
    (profile,) = bodies(api, "/worker/runners")
    assert [kind["mode"] for kind in profile["kinds"]] == ["create", "finetune"]
