"""The API api_client: timeouts always, retries only on transient failures, clear errors otherwise."""

from __future__ import annotations

import json
import logging
import time

import pytest
import requests

from runner.client import CONNECT_TIMEOUT, ApiClient
from runner.config import RetryPolicy
from runner.errors import ApiError, ApiGone, ApiUnavailable, LeaseLost, StopReason, TaskCancelled, refusal

from .conftest import API, TASK_URL, FakeApi

HEARTBEAT = f"{TASK_URL}/42/heartbeat"


def test_claim_returns_none_on_204(api, api_client):
    api.get(TASK_URL, status=204)
    assert api_client.claim("create", "text", "m", wait=0) is None


def test_claim_parses_task_and_lease(api, api_client, claim_json):
    api.get(TASK_URL, json=claim_json())
    claim = api_client.claim("create", "text", "mistralai/Mistral-7B-Instruct-v0.1", wait=5)
    assert claim is not None
    assert claim.task.id == 42 and claim.task.attempt == 1
    assert claim.task.input["messages"][-1]["content"] == "how are you today?"
    assert claim.lease.token == "l_42" and claim.lease.heartbeat_seconds == 10
    sent = api.calls[0].request
    assert sent.params == {"mode": "create", "type": "text",
                           "model_name": "mistralai/Mistral-7B-Instruct-v0.1", "wait": "5"}


def test_sends_runner_token_and_name(api, api_client):
    api.get(TASK_URL, status=204)
    api_client.claim("create", "text", "m")
    headers = api.calls[0].request.headers
    assert headers["Authorization"] == "Bearer hxr_test"
    assert headers["X-Helix-Runner"] == "test-runner"


def test_timeouts_always_passed_and_long_poll_outlasts_wait(api, api_client):
    api.get(TASK_URL, status=204)
    api.post(HEARTBEAT, json={"cancelled": False})
    api_client.claim("create", "text", "m", wait=20)
    api_client.heartbeat(42, "l_42")
    claim_timeout = api.calls[0].request.req_kwargs["timeout"]
    beat_timeout = api.calls[1].request.req_kwargs["timeout"]
    assert claim_timeout[0] == CONNECT_TIMEOUT and claim_timeout[1] > 20
    assert beat_timeout == (CONNECT_TIMEOUT, 2.0)


def test_retries_503_then_succeeds(api, api_client):
    api.post(HEARTBEAT, status=503, json={"error": "unavailable", "message": "restarting"})
    api.post(HEARTBEAT, status=503)
    api.post(HEARTBEAT, json={"cancelled": False, "lease_expires_at": "later"})
    assert api_client.heartbeat(42, "l_42") == {"cancelled": False, "lease_expires_at": "later"}
    assert len(api.calls) == 3


def test_retries_connection_error(api, api_client):
    api.post(HEARTBEAT, body=requests.ConnectionError("connection refused"))
    api.post(HEARTBEAT, json={"cancelled": False})
    assert api_client.heartbeat(42, "l_42") == {"cancelled": False}
    assert len(api.calls) == 2


def test_retries_timeout(api, api_client):
    api.get(TASK_URL, body=requests.ReadTimeout("slow"))
    api.get(TASK_URL, status=204)
    assert api_client.claim("create", "text", "m") is None
    assert len(api.calls) == 2


def test_retries_429(api, api_client):
    api.post(HEARTBEAT, status=429, json={"error": "too_many_requests", "message": "slow down"})
    api.post(HEARTBEAT, json={"cancelled": False})
    assert api_client.heartbeat(42, "l_42") == {"cancelled": False}
    assert len(api.calls) == 2


def test_gives_up_after_max_attempts(api, api_client):
    api.post(HEARTBEAT, status=502)
    with pytest.raises(ApiUnavailable) as caught:
        api_client.heartbeat(42, "l_42")
    assert caught.value.status == 502
    assert len(api.calls) == 3  # FAST_RETRY.attempts


def test_backoff_is_capped_and_honours_retry_after_within_cap():
    api_client = ApiClient(API, "t", "r", retry=RetryPolicy(attempts=10, initial=1, cap=4))
    slept: list[float] = []
    with FakeApi() as api:
        api.post(HEARTBEAT, status=429, headers={"Retry-After": "3"})
        api.post(HEARTBEAT, status=503)
        api.post(HEARTBEAT, json={})
        original = api_client._wait

        def record(state):
            delay = original(state)
            slept.append(delay)
            return 0  # the test need not actually wait

        api_client._wait = record
        api_client.heartbeat(42, "l")
    assert slept[0] >= 3  # Retry-After respected
    assert all(0 <= delay <= 4 for delay in slept)


def test_no_retry_on_400_and_message_kept(api, api_client):
    api.get(TASK_URL, status=400, json={"error": "unknown_model", "message": "no model named 'x'"})
    with pytest.raises(ApiError) as caught:
        api_client.claim("create", "text", "x")
    assert caught.value.status == 400
    assert caught.value.code == "unknown_model"
    assert "no model named 'x'" in str(caught.value)
    assert len(api.calls) == 1


def test_no_retry_on_401(api, api_client):
    api.get(TASK_URL, status=401, json={"error": "unauthorized", "message": "unknown runner token"})
    with pytest.raises(ApiError, match="unknown runner token"):
        api_client.claim("create", "text", "m")
    assert len(api.calls) == 1


def test_409_lease_lost_raises_lease_lost(api, api_client):
    api.post(f"{TASK_URL}/42/complete", status=409, json={"error": "lease_lost", "message": "stale lease"})
    with pytest.raises(LeaseLost):
        api_client.complete(42, "l_old", {"text": "x"})
    assert len(api.calls) == 1


def test_409_task_cancelled_raises_task_cancelled(api, api_client):
    api.post(f"{TASK_URL}/42/events", status=409, json={"error": "task_cancelled", "message": "cancelled"})
    with pytest.raises(TaskCancelled) as caught:
        api_client.post_events(42, "l_42", [{"seq": 1, "kind": "token", "text": "x"}])
    assert caught.value.reason == StopReason.CANCELLED


def test_any_other_409_means_the_lease_is_lost(api, api_client):
    api.post(f"{TASK_URL}/42/release", status=409, json={"error": "conflict", "message": "not running"})
    with pytest.raises(LeaseLost) as caught:
        api_client.release(42, "l_42")
    assert caught.value.status == 409 and caught.value.code == "conflict"


def test_one_mapping_from_refusal_to_error():
    cancelled = refusal(None, "task_cancelled", "by the user")
    assert isinstance(cancelled, TaskCancelled) and cancelled.reason == StopReason.CANCELLED
    assert isinstance(refusal(None, "lease_lost", "stale"), LeaseLost)
    assert isinstance(refusal(409, "", "stale"), LeaseLost)
    refused = refusal(400, "", "bad")
    assert type(refused) is ApiError and refused.code == "http_error" and str(refused) == "400 http_error: bad"


def test_the_connection_pool_has_the_size_asked_for():
    sized = ApiClient(API, "t", "r", pool_size=12)
    for url in (API, "https://helix.example"):
        assert sized.session.get_adapter(url)._pool_maxsize == 12
    sized.close()


def test_worker_bodies_follow_the_protocol(api, api_client):
    for action in ("events", "complete", "fail", "release"):
        api.post(f"{TASK_URL}/42/{action}", json={"status": "ok"})
    api_client.post_events(42, "l", [{"seq": 1, "kind": "token", "text": "a"}])
    api_client.complete(42, "l", {"text": "a"})
    api_client.fail(42, "l", "trace", retry=True)
    api_client.release(42, "l")
    sent = [json.loads(call.request.body) for call in api.calls]
    assert sent == [
        {"lease_token": "l", "events": [{"seq": 1, "kind": "token", "text": "a"}]},
        {"lease_token": "l", "result": {"text": "a"}},
        {"lease_token": "l", "error": "trace", "retry": True},
        {"lease_token": "l"},
    ]


def test_a_stopping_client_gives_up_on_an_unreachable_api_after_its_grace_with_one_line(api, caplog):
    # A policy that would retry for a minute: the grace, not the policy, ends it.
    patient = ApiClient(API, "hxr_test", "test-runner", timeout=2.0,
                        retry=RetryPolicy(attempts=1000, max_delay=60.0, initial=0.05, cap=0.1))
    api.post(f"{TASK_URL}/42/release", body=requests.ConnectionError("connection refused"))
    gone: list[bool] = []
    patient.stopping(0.3, on_gone=lambda: gone.append(True))
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="runner.client"), pytest.raises(ApiGone):
        patient.release(42, "l_42")
    assert 0.25 <= time.monotonic() - started < 2.0
    assert len(api.calls) >= 2 and gone == [True]
    # Every later call gives up at once, and says nothing more.
    calls = len(api.calls)
    with caplog.at_level(logging.INFO, logger="runner.client"), pytest.raises(ApiGone):
        patient.heartbeat(42, "l_42")
    assert len(api.calls) == calls
    lines = [r.getMessage() for r in caplog.records if r.name == "runner.client"]
    assert len(lines) == 1 and "unreachable" in lines[0] and "while stopping" in lines[0], lines
    patient.close()


def test_a_stopping_client_still_retries_within_its_grace(api, api_client):
    api.post(f"{TASK_URL}/42/release", body=requests.ConnectionError("connection refused"))
    api.post(f"{TASK_URL}/42/release", json={"status": "queued"})
    api_client.stopping(5.0)
    assert api_client.release(42, "l_42") == {"status": "queued"}


def _query(request) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl, urlsplit

    return parse_qsl(urlsplit(request.url).query)


def test_a_poll_of_several_kinds_names_each_queue_and_the_warm_adapters(api, api_client, claim_json):
    from runner.config import Kind

    api.get(TASK_URL, json={"tasks": [claim_json(task_id=1), claim_json(task_id=2, mode="finetune")]})
    kinds = [Kind("create", "text", "m"), Kind("finetune", "text", "m")]
    claims = api_client.claim_kinds(kinds, 2, wait=3, warm=["a" * 64, "b" * 64])
    assert [claim.task.mode for claim in claims] == ["create", "finetune"]
    assert _query(api.calls[0].request) == [("kind", "create:text:m"), ("kind", "finetune:text:m"),
                                            ("warm", "a" * 64), ("warm", "b" * 64), ("max", "2"), ("wait", "3")]


def test_one_kind_keeps_the_seed_claim_url_and_adds_only_the_warm_adapters(api, api_client, claim_json):
    api.get(TASK_URL, json=claim_json())
    assert api_client.claim("create", "text", "m", warm=["k1"]) is not None
    assert _query(api.calls[0].request) == [("mode", "create"), ("type", "text"), ("model_name", "m"),
                                            ("warm", "k1")]
