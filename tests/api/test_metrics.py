"""/metrics: off the public API unless the operator's token is sent; what it shows after real work."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEXT_MODEL, bearer, claim

TOKEN = "metrics-secret"


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A scraper's token."""
    return {**settings, "METRICS_TOKEN": TOKEN}


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client, by (name, labels)."""
    response = client.get("/metrics", headers=bearer(TOKEN))
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}


def kind(**extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"mode": "create", "type": "text", "model": TEXT_MODEL, **extra}.items()))


def test_metrics_need_the_operators_token(client, user, make_client):
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers=bearer("wrong")).status_code == 404
    assert client.get("/metrics", headers=user).status_code == 404
    assert client.get("/metrics", headers=bearer(TOKEN)).status_code == 200
    assert make_client(METRICS_TOKEN="").get("/metrics", headers=bearer("")).status_code == 404


def test_counters_and_gauges_follow_the_work(client, user, runner, task_factory):
    before = scrape(client)
    for _ in range(3):
        task_factory()
    queued = scrape(client)
    assert queued[("helix_queue_depth", kind())] == 3
    assert queued[("helix_database_up", ())] == 1

    claimed = claim(client, {**runner, "X-Helix-Runner": "gpu-1"}).json
    task_id, token = claimed["task"]["id"], claimed["lease"]["token"]
    events = [{"seq": 1, "kind": "token", "text": "Hel"}, {"seq": 2, "kind": "token", "text": "lo"}]
    assert client.post(f"/api/v1/worker/task/{task_id}/events", headers=runner,
                       json={"lease_token": token, "events": events}).status_code == 200
    usage = {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}
    assert client.post(f"/api/v1/worker/task/{task_id}/complete", headers=runner,
                       json={"lease_token": token, "result": {"text": "Hello", "usage": usage}}).status_code == 200
    second = claim(client, {**runner, "X-Helix-Runner": "gpu-1"}).json
    client.post(f"/api/v1/worker/task/{second['task']['id']}/fail", headers=runner,
                json={"lease_token": second["lease"]["token"], "error": "boom", "retry": True})

    after = scrape(client)

    def delta(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("helix_tasks_finished_total", kind(outcome="complete")) == 1
    assert delta("helix_generated_tokens_total", (("model", TEXT_MODEL),)) == 9
    assert delta("helix_prompt_tokens_total", (("model", TEXT_MODEL),)) == 4
    assert delta("helix_task_requeues_total", kind(reason="failed")) == 1
    assert delta("helix_queue_wait_seconds_count", kind()) == 2
    assert delta("helix_time_to_first_token_seconds_count", (("model", TEXT_MODEL),)) == 1
    assert delta("helix_time_per_output_token_seconds_count", (("model", TEXT_MODEL),)) == 1
    assert after[("helix_queue_depth", kind())] == 2  # the one that failed went back
    assert after[("helix_runners_live", kind())] == 1
    requests = delta("helix_http_request_duration_seconds_count", (("group", "worker"), ("method", "POST"),
                                                                    ("status", "2xx")))
    assert requests == 3


def test_an_empty_queue_that_runners_serve_reads_zero(client, runner):
    assert claim(client, {**runner, "X-Helix-Runner": "gpu-1"}).status_code == 204  # a runner asks: nothing
    samples = scrape(client)
    assert samples[("helix_runners_live", kind())] == 1
    assert samples[("helix_queue_depth", kind())] == 0 and samples[("helix_tasks_running", kind())] == 0
