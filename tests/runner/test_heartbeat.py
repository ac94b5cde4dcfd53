"""The heartbeat thread: renews the lease, hears cancellation, survives transient errors."""

from __future__ import annotations

import threading

from runner.errors import StopReason
from runner.heartbeat import Heartbeat
from runner.messages import Lease

from .conftest import TASK_URL

HEARTBEAT = f"{TASK_URL}/42/heartbeat"
LEASE = Lease(token="l_42", expires_at=None, ttl_seconds=1, heartbeat_seconds=0.01)


def run_until_stopped(api_client) -> list[StopReason]:
    stopped: list[StopReason] = []
    done = threading.Event()

    def on_stop(reason: StopReason) -> None:
        stopped.append(reason)
        done.set()

    beat = Heartbeat(api_client, 42, LEASE, on_stop=on_stop)
    beat.start()
    assert done.wait(5), "the heartbeat never stopped the task"
    beat.stop()
    return stopped


def test_cancelled_reply_stops_the_task(api, api_client):
    api.post(HEARTBEAT, json={"cancelled": False, "lease_expires_at": "later"})
    api.post(HEARTBEAT, json={"cancelled": True, "lease_expires_at": None})
    assert run_until_stopped(api_client) == [StopReason.CANCELLED]
    assert [call.request.body for call in api.calls] == [b'{"lease_token": "l_42"}'] * 2


def test_lease_lost_stops_the_task(api, api_client):
    api.post(HEARTBEAT, status=409, json={"error": "lease_lost", "message": "expired"})
    assert run_until_stopped(api_client) == [StopReason.LEASE_LOST]


def test_survives_the_api_being_down(api, api_client):
    # FAST_RETRY gives up after 3 attempts: two whole failed beats, then a cancel gets through.
    for _ in range(6):
        api.post(HEARTBEAT, status=503)
    api.post(HEARTBEAT, json={"cancelled": True})
    assert run_until_stopped(api_client) == [StopReason.CANCELLED]
    assert len(api.calls) == 7


def test_stop_ends_the_thread(api, api_client):
    api.post(HEARTBEAT, json={"cancelled": False})
    beat = Heartbeat(api_client, 42, LEASE, on_stop=lambda reason: None)
    beat.start()
    beat.stop()
    assert not beat._thread.is_alive()


def test_each_beat_carries_the_runners_profile(api, api_client):
    import json

    api.post(HEARTBEAT, json={"cancelled": False, "lease_expires_at": "later"})
    api.post(HEARTBEAT, json={"cancelled": True, "lease_expires_at": None})
    profiles = iter([{"slots": {"total": 2, "busy": 1}}, {"slots": {"total": 2, "busy": 2}}])
    done = threading.Event()
    beat = Heartbeat(api_client, 42, LEASE, on_stop=lambda reason: done.set(), describe=lambda: next(profiles))
    beat.start()
    assert done.wait(5)
    beat.stop()
    sent = [json.loads(call.request.body) for call in api.calls]
    assert [body["runner"]["slots"]["busy"] for body in sent] == [1, 2]
    assert all(body["lease_token"] == "l_42" for body in sent)


def test_a_profile_that_cannot_be_read_leaves_the_beat_without_it(api, api_client):
    api.post(HEARTBEAT, json={"cancelled": True, "lease_expires_at": None})
    done = threading.Event()

    def broken() -> dict:
        raise RuntimeError("NVML went away")

    beat = Heartbeat(api_client, 42, LEASE, on_stop=lambda reason: done.set(), describe=broken)
    beat.start()
    assert done.wait(5)
    beat.stop()
    assert api.calls[0].request.body == b'{"lease_token": "l_42"}'
