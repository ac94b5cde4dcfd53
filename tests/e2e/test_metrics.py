"""Metrics end to end: gunicorn with two workers, runners that work and die, scrapes that agree with SQL."""

from __future__ import annotations

import json
import signal

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEXT_MODEL
from tests.e2e.client import create_session, echo_of, reply_of, wait_for_reply, wait_for_session
from tests.e2e.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MESSAGE = " ".join(f"word{i:02d}" for i in range(30))
KIND = (("mode", "create"), ("model", TEXT_MODEL), ("type", "text"))


def kind(**extra: str) -> tuple[tuple[str, str], ...]:
    """The labels of the text model's queue, and `extra`, as scrape() keys them."""
    return tuple(sorted({**dict(KIND), **extra}.items()))


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at `url`, parsed by prometheus_client's own parser."""
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_counters_equal_what_sql_says_under_two_workers_after_a_kill_9(api_server, runner_process):
    metrics_port, runner_port = free_port(), free_port()
    server = api_server(workers=2, metrics_bind=f"127.0.0.1:{metrics_port}", lease_seconds=3, heartbeat_seconds=1)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    user = server.user
    # Off the public API, and the metrics address serves nothing else.
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 404
    assert requests.get(f"http://127.0.0.1:{metrics_port}/api/v1/sessions", headers=user, timeout=10).status_code == 404

    doomed = create_session(server, user, MESSAGE, token_delay=0.05)
    runner_a = runner_process(server, "runner-a")
    wait_for_session(server, user, doomed["id"], lambda s: bool(reply_of(s)["output"]), 30, "the reply to stream")
    runner_a.signal(signal.SIGKILL)
    assert runner_a.wait(10) == -signal.SIGKILL
    runner_process(server, "runner-b", extra=("--metrics-port", str(runner_port),
                                              "--metrics-host", "127.0.0.1"))
    sessions = [doomed] + [create_session(server, user, f"quick reply number {n}") for n in range(5)]
    for session in sessions:
        assert wait_for_reply(server, user, session["id"], 60)["state"] == "complete"
    assert wait_for_reply(server, user, doomed["id"], 5)["output"] == echo_of(MESSAGE)

    completed = server.sql("SELECT count(*) FROM tasks WHERE status = 'complete'")[0][0]
    results = [json.loads(r) if isinstance(r, str) else r for (r,) in server.sql(
        "SELECT result FROM tasks WHERE status = 'complete'")]
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    requeued = server.sql("SELECT count(*) FROM task_usage WHERE outcome = 'retried'")[0][0]
    expired = sum("lease expired" in (json.loads(d) if isinstance(d, str) else d).get("reason", "") for (d,) in
                  server.sql("SELECT data FROM task_events WHERE kind = 'state'"))
    assert (completed, requeued, expired) == (6, 1, 1)

    # Whichever worker answers, the totals are every worker's: scrape a few times, expect the same figures.
    scrapes = [scrape(metrics_url) for _ in range(4)]
    for samples in scrapes:
        assert samples[("helix_tasks_finished_total", kind(outcome="complete"))] == completed
        assert samples[("helix_generated_tokens_total", (("model", TEXT_MODEL),))] == tokens
        assert samples[("helix_task_requeues_total", kind(reason="lease_expired"))] == requeued
        assert samples[("helix_lease_expiries_total", KIND)] == expired
        assert samples[("helix_queue_wait_seconds_count", KIND)] == completed + requeued
        assert samples.get(("helix_queue_depth", KIND), 0) == 0  # a queue with nothing open has no series
        assert samples[("helix_runners_live", KIND)] == 2  # a runner is live for a minute after it was heard from
    assert sum(v for (name, _), v in scrapes[-1].items() if name == "helix_http_request_duration_seconds_count") > 0

    mine = server.sql("SELECT count(*) FROM tasks WHERE runner = 'runner-b' AND status = 'complete'")[0][0]
    runner = scrape(f"http://127.0.0.1:{runner_port}/metrics")
    assert runner[("helix_runner_tasks_total", (("mode", "create"), ("outcome", "complete")))] == mine == 6
    assert runner[("helix_runner_slots", ())] == 1 and runner[("helix_runner_slots_in_use", ())] == 0
    assert runner[("helix_runner_generated_tokens_total", ())] == tokens
    assert runner[("helix_runner_model_load_seconds", ())] >= 0
