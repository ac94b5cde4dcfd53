"""Fixtures for the runner's unit tests: a fake API with `responses` and tiny retry waits."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import responses

from runner.client import ApiClient
from runner.config import RetryPolicy, RunnerConfig

API = "http://helix.test:8080"
TASK_URL = f"{API}/api/v1/worker/task"
FAST_RETRY = RetryPolicy(attempts=3, max_delay=5.0, initial=0.001, cap=0.002)


class FakeApi(responses.RequestsMock):
    """`responses` with the `get`/`post` shortcuts of its newer releases.

    axolotl pins evaluate 0.4.1, which holds `responses` below 0.19, before those shortcuts existed.
    """

    def get(self, url: str, **kwargs: Any) -> Any:
        """Answer GET `url`."""
        return self.add(responses.GET, url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        """Answer POST `url`."""
        return self.add(responses.POST, url, **kwargs)


@pytest.fixture
def api() -> Iterator[FakeApi]:
    """A fake API; unmatched requests raise ConnectionError, as a missing server would."""
    with FakeApi(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def api_client() -> Iterator[ApiClient]:
    """An API client with tiny retry waits."""
    api_client = ApiClient(API, "hxr_test", "test-runner", timeout=2.0, retry=FAST_RETRY)
    yield api_client
    api_client.close()


@pytest.fixture
def config() -> RunnerConfig:
    """A config for fast loop tests: no long poll, tiny pauses."""
    return RunnerConfig(api_url=API, token="hxr_test", mode="create", type="text",
                        model_name="mistralai/Mistral-7B-Instruct-v0.1", backend="tests.doubles:EchoBackend",
                        runner_name="test-runner", wait=0, idle_sleep=0.01, error_backoff=0.01,
                        grace_seconds=0.2, flush_interval=0.01, retry=FAST_RETRY)


@pytest.fixture
def claim_json() -> Callable[..., dict[str, Any]]:
    """A claim reply; keyword overrides go into the task, `lease` overrides into the lease."""

    def make(task_id: int = 42, lease: dict[str, Any] | None = None, **task: Any) -> dict[str, Any]:
        body = {
            "id": task_id, "session_id": 7, "interaction_id": 19, "mode": "create", "type": "text",
            "model_name": "mistralai/Mistral-7B-Instruct-v0.1", "attempt": 1,
            "input": {"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello!"},
                                   {"role": "user", "content": "how are you today?"}]},
            "params": {"max_new_tokens": 64}, "adapter": None, "files": [],
        }
        body.update(task)
        return {"task": body, "lease": {"token": f"l_{task_id}", "expires_at": "2026-11-22T04:00:30+00:00",
                                         "ttl_seconds": 30, "heartbeat_seconds": 10, **(lease or {})}}

    return make


def bodies(api: responses.RequestsMock, suffix: str) -> list[dict[str, Any]]:
    """The JSON bodies posted to URLs ending in `suffix`, in order."""
    return [json.loads(call.request.body) for call in api.calls if call.request.url.endswith(suffix)]


def posted_events(api: responses.RequestsMock, task_id: int = 42) -> list[dict[str, Any]]:
    """Every event sent for a task, in sending order: posted, or carried with the result."""
    sent = []
    for call in api.calls:
        url = call.request.url
        if url.endswith(f"/{task_id}/events") or url.endswith(f"/{task_id}/complete"):
            sent.extend(json.loads(call.request.body).get("events", []))
        elif url.endswith("/worker/events"):  # several tasks' posts in one request
            for post in json.loads(call.request.body)["posts"]:
                if post["task_id"] == task_id:
                    sent.extend(post["events"])
    return sent
