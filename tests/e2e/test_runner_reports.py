"""Runners say what they are, end to end: `helix-runner --max-parallel auto` on the tiny model reports its
hardware, kinds and slots to `helix serve`, and the admin API shows them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

import runner
from tests.conftest import bearer
from tests.e2e.client import create_session, wait_for_reply
from tests.e2e.processes import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _listed(server, admin: dict[str, str], name: str) -> dict | None:
    listing = requests.get(f"{server.url}/api/v1/admin/runners", headers=admin, timeout=10)
    assert listing.status_code == 200, listing.text
    return next((r for r in listing.json()["runners"] if r["name"] == name), None)


def test_a_runner_reports_itself_and_its_auto_slots_to_the_admin_api(text_api, tiny_mistral: Path, text_runner):
    admin = bearer(text_api.helix("users", "create", "root", "--admin").strip().splitlines()[-1])
    # The cap decides here: this machine's RAM holds thousands of the tiny model's 512 KiB caches.
    text_runner(text_api, "create", tiny_mistral, "auto-1", max_parallel="auto",
                env={"HELIX_RUNNER_MAX_PARALLEL_CAP": "3"})
    listed = wait_for(lambda: _listed(text_api, admin, "auto-1"), 120, "the runner's report")
    assert listed["alive"] and listed["reported_at"]
    assert listed["backend"] == "mistral" and listed["version"] == runner.__version__
    assert listed["kinds"] == [{"mode": "create", "type": "text", "model_name": str(tiny_mistral)}]
    assert listed["slots"] == {"total": 3, "busy": 0, "free": 3}
    cpu = listed["hardware"]["cpu"]
    assert cpu["cores"] == os.cpu_count() and 0 < cpu["memory_available"] <= cpu["memory_total"]
    assert listed["hardware"]["gpus"] == []  # NVML finds no GPU here

    # A chat gets its reply from the runner that reported itself.
    session = create_session(text_api, text_api.user, "Hello there!", model=tiny_mistral, max_new_tokens=8)
    assert wait_for_reply(text_api, text_api.user, session["id"], 120)["state"] == "complete"


def test_heartbeats_carry_the_report_while_a_task_runs(api_server, runner_process):
    server = api_server()  # heartbeats every second
    admin = bearer(server.helix("users", "create", "root", "--admin").strip().splitlines()[-1])
    runner_process(server, "echo-1", extra=("--max-parallel", "2"))
    first = wait_for(lambda: _listed(server, admin, "echo-1"), 60, "the runner's report at start")
    assert first["slots"] == {"total": 2, "busy": 0, "free": 2}
    # Longer than the registry's write interval (5 s): a report in a heartbeat is stored at most that often.
    session = create_session(server, server.user, "slow echo", sleep=8)

    def busy() -> dict | None:
        listed = _listed(server, admin, "echo-1")
        return listed if listed["slots"]["busy"] == 1 else None

    during = wait_for(busy, 30, "a heartbeat's report of one busy slot")
    assert during["reported_at"] > first["reported_at"] and during["slots"]["free"] == 1
    assert wait_for_reply(server, server.user, session["id"], 60)["state"] == "complete"
