"""Credentials: who may call what."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from helix_api.accounts import auth
from helix_api.models import ApiKey, RunnerToken, utcnow
from tests.conftest import SEED_CLAIM_URL, bearer

USER_ENDPOINTS = [("get", "/api/v1/sessions"), ("post", "/api/v1/sessions"), ("get", "/api/v1/models"),
                  ("get", "/api/v1/sessions/1"), ("get", "/api/v1/sessions/1/events")]
WORKER_ENDPOINTS = [("get", SEED_CLAIM_URL), ("post", "/api/v1/worker/task/1/heartbeat"),
                    ("post", "/api/v1/worker/task/1/complete")]


@pytest.mark.parametrize("method,url", USER_ENDPOINTS + WORKER_ENDPOINTS)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer hx_nope"}, {"Authorization": "Basic abc"}])
def test_missing_or_unknown_credentials_are_401(client, method, url, headers):
    response = getattr(client, method)(url, headers=headers, json={})
    assert response.status_code == 401
    assert response.json["error"] == "unauthorized"


@pytest.mark.parametrize("method,url", USER_ENDPOINTS)
def test_runner_token_on_user_endpoint_is_403(client, runner, method, url):
    response = getattr(client, method)(url, headers=runner, json={})
    assert response.status_code == 403 and "API key" in response.json["message"]


@pytest.mark.parametrize("method,url", WORKER_ENDPOINTS)
def test_api_key_on_worker_endpoint_is_403(client, user, method, url):
    response = getattr(client, method)(url, headers=user, json={})
    assert response.status_code == 403 and "runner token" in response.json["message"]


def test_keys_are_stored_hashed(db, make_user, runner):
    headers = make_user("carol")
    key = headers["Authorization"].split()[1]
    token = runner["Authorization"].split()[1]
    with db.orm_read() as s:
        hashes = set(s.scalars(select(ApiKey.key_hash))) | set(s.scalars(select(RunnerToken.token_hash)))
    assert key not in hashes and auth.hash_secret(key) in hashes and auth.hash_secret(token) in hashes
    assert key.startswith("hx_") and token.startswith("hxr_")


def test_revoked_key_is_refused(settings, request):
    settings["AUTH_CACHE_SECONDS"] = 0.0  # revoked by another process: seen at once only without the cache
    client, db, make_user = (request.getfixturevalue(name) for name in ("client", "db", "make_user"))
    headers = make_user("dave")
    assert client.get("/api/v1/sessions", headers=headers).status_code == 200
    with db.orm_write() as s:
        s.execute(update(ApiKey).values(revoked_at=utcnow()))
    assert client.get("/api/v1/sessions", headers=headers).status_code == 401


def test_a_key_revoked_elsewhere_is_refused_once_its_cache_entry_expires(client, db, make_user, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth, "_callers", auth._CallerCache(clock=lambda: now[0]))
    headers = make_user("erin")
    assert client.get("/api/v1/sessions", headers=headers).status_code == 200
    with db.orm_write() as s:  # as another process would: this one is not told
        s.execute(update(ApiKey).values(revoked_at=utcnow()))
    assert client.get("/api/v1/sessions", headers=headers).status_code == 200  # looked up once per key
    now[0] += 5.0  # AUTH_CACHE_SECONDS, by default
    assert client.get("/api/v1/sessions", headers=headers).status_code == 401


def test_revoking_a_key_in_this_process_refuses_it_at_once(client, db, make_user):
    headers = make_user("frank")
    assert client.get("/api/v1/sessions", headers=headers).status_code == 200
    assert auth.revoke_api_keys(db, headers["Authorization"].split()[1][:10]) == 1
    assert client.get("/api/v1/sessions", headers=headers).status_code == 401


def test_bearer_scheme_is_case_insensitive(client, user):
    key = user["Authorization"].split()[1]
    assert client.get("/api/v1/sessions", headers={"Authorization": f"bearer {key}"}).status_code == 200
    assert client.get("/api/v1/sessions", headers=bearer(key)).status_code == 200
