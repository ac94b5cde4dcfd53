"""The usage page (the user's own figures) and the admin page's totals per user."""

from __future__ import annotations

from tests.conftest import TEXT_ALIAS, claim
from tests.web.test_views import new_chat


def _complete(client, runner, completion: int) -> None:
    claimed = claim(client, runner).json
    usage = {"prompt_tokens": 2, "completion_tokens": completion, "total_tokens": 2 + completion}
    assert client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner, json={
        "lease_token": claimed["lease"]["token"], "result": {"text": "ok", "usage": usage}}).status_code == 200


def test_the_usage_page_shows_the_users_own_totals(make_browser, browser, client, runner):
    new_chat(browser, "one")
    _complete(client, runner, 7)
    bob = make_browser("bob")
    new_chat(bob, "two")
    _complete(client, runner, 5)

    html = browser.get("/usage").data.decode()
    row = html.split(f'<tr data-key="{TEXT_ALIAS}">')[1].split("</tr>")[0]
    assert '<td class="tasks">1</td>' in row and '<td class="completion-tokens">7</td>' in row
    assert 'data-group-by="day"' in html and 'href="/usage"' in html
    assert '<td class="completion-tokens">5</td>' not in html  # bob's

    admin = make_browser("root", admin=True)
    page = admin.get("/admin").data.decode()
    for name, tokens in (("alice", 7), ("bob", 5)):
        row = page.split(f'<tr data-user="{name}">')[1].split("</tr>")[0]
        assert f'<td class="completion-tokens">{tokens}</td>' in row


def test_the_usage_page_needs_a_sign_in(client):
    response = client.get("/usage")
    assert response.status_code == 302 and "/signin?next=/usage" in response.headers["Location"]
