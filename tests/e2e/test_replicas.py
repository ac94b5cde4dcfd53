"""Replicas: several `helix serve` on one PostgreSQL, as on separate machines, hand work to each other's runners."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import requests

from tests.e2e.client import create_session
from tests.e2e.processes import CLAIM_PARAMS, CLAIM_PATH, ApiServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _replica_of(first: ApiServer, tmp_path, settings: dict[str, Any]) -> ApiServer:
    """Another `helix serve` on the first one's database, with its user and runner token."""
    replica = ApiServer(first.database_url, tmp_path / "data-2", tmp_path, settings, None, lambda path: None)
    replica.starts = 1  # the user and the runner token are the first replica's: make none
    replica.start()
    replica.api_key, replica.user, replica.runner_token = first.api_key, first.user, first.runner_token
    return replica


@pytest.mark.timeout(90)
@pytest.mark.parametrize("e2e_database", ["postgres"], indirect=True)
def test_a_task_created_on_one_replica_wakes_a_runner_waiting_on_another(api_server, tmp_path):
    # The re-check timer is far beyond the long poll: only the wake-up relayed by PostgreSQL NOTIFY
    # can bring the task to the runner before its poll ends empty.
    settings = {"recheck_seconds": 120, "lease_seconds": 30, "heartbeat_seconds": 10, "reap_seconds": 1}
    first = api_server(**settings)
    second = _replica_of(first, tmp_path, {**settings, "extra_params": "sleep,token_delay"})
    try:
        box: dict[str, Any] = {}
        polling = threading.Event()

        def long_poll() -> None:
            polling.set()
            box["response"] = requests.get(f"{second.url}{CLAIM_PATH}", params={**CLAIM_PARAMS, "wait": "30"},
                                           headers=second.runner_headers, timeout=40)

        poller = threading.Thread(target=long_poll)
        poller.start()
        polling.wait(5)
        time.sleep(1.0)  # the poll has looked at the empty queue and waits: only a wake-up can end it early
        assert "response" not in box, "the long poll should still be waiting for work"
        session = create_session(first, first.user, "from the other replica")
        poller.join(35)
        response = box["response"]
        assert response.status_code == 200, response.text
        assert response.json()["task"]["session_id"] == session["id"]
        # A poll that was never woken still claims the task when its 30 s are up: the database's own
        # clock tells a wake-up (about at once) from that.
        ((queued_at, claimed_at),) = first.sql("SELECT queued_at, claimed_at FROM tasks WHERE session_id = :s",
                                               s=session["id"])
        assert (claimed_at - queued_at).total_seconds() < 15
    finally:
        second.dispose()
