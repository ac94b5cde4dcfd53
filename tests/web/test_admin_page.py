"""The admin page: runners seen, queue depth per model, fine-tune reservations, recent failures; for admins only."""

from __future__ import annotations

from helix_api.tasks import reservations
from tests.conftest import IMAGE_MODEL, TEXT_MODEL, claim
from tests.web.test_views import new_chat


def test_the_admin_page_is_for_admins_only(browser):
    response = browser.get("/admin")
    assert response.status_code == 403 and response.mimetype == "text/html" and b"for admins" in response.data
    assert b'href="/admin"' not in browser.get("/").data  # no link to it either


def test_admins_see_runners_queues_and_failures(make_browser, browser, client, runner):
    admin = make_browser("root", admin=True)
    assert b'href="/admin"' in admin.get("/").data
    for message in ("one", "two", "three"):
        new_chat(browser, message)
    assert b"No runner has polled yet" in admin.get("/admin").data

    failing = claim(client, {**runner, "X-Helix-Runner": "gpu7-1234"}).json
    client.post(f"/api/v1/worker/task/{failing['task']['id']}/fail", headers=runner, json={
        "lease_token": failing["lease"]["token"], "error": "CUDA out of memory on gpu7", "retry": False})
    held = claim(client, {**runner, "X-Helix-Runner": "gpu7-1234"}).json
    claim(client, {**runner, "X-Helix-Runner": "sdxl-1"}, model=IMAGE_MODEL)

    html = admin.get("/admin").data.decode()

    assert 'data-runner="gpu7-1234"' in html and 'data-runner="sdxl-1"' in html
    assert f"task {held['task']['id']} (session {held['task']['session_id']}, claimed, attempt 1)" in html
    assert f'<tr data-model="{TEXT_MODEL}" data-mode="create">' in html
    queue_row = html.split(f'<tr data-model="{TEXT_MODEL}"')[1].split("</tr>")[0]
    assert '<td class="queued">1</td>' in queue_row and '<td class="running">1</td>' in queue_row
    assert f'data-task-id="{failing["task"]["id"]}"' in html and "CUDA out of memory on gpu7" in html
    assert "failed after 1 attempt<" in html and "alice" in html
    assert 'data-refresh="5000"' in html and "data-refresh-toggle" in html  # refreshed by helix.js, pausable


def test_admins_see_each_runners_report_and_slots(make_browser, client, runner):
    from tests.api.test_runner_reports import report

    admin = make_browser("root", admin=True)
    client.post("/api/v1/worker/runners", json=report(), headers={**runner, "X-Helix-Runner": "gpu-1"})
    claim(client, {**runner, "X-Helix-Runner": "seed-runner"})
    html = admin.get("/admin").data.decode()
    row = html.split('data-runner="gpu-1"')[1].split("</tr>")[0]
    assert "NVIDIA H100 80GB HBM3: 60.0 GiB free of 80.0 GiB" in row
    assert "AMD EPYC 9454, 16 cores, 100.0 GiB free of 128.0 GiB RAM" in row
    assert '<td class="slots">1 busy of 4 (3 free)</td>' in row
    assert 'title="' + "ab" * 32 + '"' in row and '<td class="version">0.1.0</td>' in row and "(mistral)" in row
    seed = html.split('data-runner="seed-runner"')[1].split("</tr>")[0]
    assert '<td class="slots">not reported</td>' in seed


def test_admins_see_reservations_and_each_runners_pool(make_browser, client, runner, db):
    both = [("kind", f"create:text:{TEXT_MODEL}"), ("kind", f"finetune:text:{TEXT_MODEL}")]
    for name in ("gpu-1", "gpu-2"):
        client.get("/api/v1/worker/task", query_string=both, headers={**runner, "X-Helix-Runner": name})
    admin = make_browser("root", admin=True)
    assert b"No reservations." in admin.get("/admin").data
    reservations.reserve(db, TEXT_MODEL, 3)

    html = admin.get("/admin").data.decode()

    row = html.split(f'<tr data-reservation="{TEXT_MODEL}">')[1].split("</tr>")[0]
    assert '<td class="reserved">3</td>' in row and '<td class="pool-runners">2</td>' in row
    assert "larger than the 2 runners serving it" in row
    assert "pool: inference and fine-tuning of" in html.split('data-runner="gpu-1"')[1].split("</tr>")[0]
    reservations.reserve(db, TEXT_MODEL, 2)
    assert "larger than" not in admin.get("/admin").data.decode()
