"""Signing in to the web app with an API key, signing out, and what a signed-out browser gets."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from helix_api.models import ApiKey, Task, utcnow
from tests.conftest import TEXT_ALIAS, TEXT_MODEL, bearer
from tests.web.conftest import csrf_of, sign_in, submit


def test_a_good_key_signs_in_and_returns_to_the_page_asked_for(client, make_key):
    key = make_key("alice")
    asked = client.get("/new/chat")
    assert asked.status_code == 302 and asked.headers["Location"] == "/signin?next=/new/chat"

    response = sign_in(client, key, next_path="/new/chat")

    assert response.status_code == 302 and response.headers["Location"] == "/new/chat"
    page = client.get("/new/chat")
    assert page.status_code == 200 and b"alice" in page.data and TEXT_ALIAS.encode() in page.data


def test_the_cookie_is_httponly_lax_and_holds_no_key(client, make_key):
    key = make_key()
    cookie = sign_in(client, key).headers["Set-Cookie"]
    assert cookie.startswith("helix_session=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie and key not in cookie


def test_the_cookie_is_secure_when_configured(make_client, make_key):
    key = make_key()
    cookie = sign_in(make_client(COOKIE_SECURE=True), key).headers["Set-Cookie"]
    assert "Secure" in cookie


@pytest.mark.parametrize("key,message", [
    ("hx_not-a-real-key", "Unknown or revoked API key"),
    ("hxr_a-runner-token", "That is a runner token"),
    ("", "Paste your API key"),
])
def test_a_bad_key_shows_the_error_next_to_the_field(client, key, message):
    response = sign_in(client, key)
    assert response.status_code == 400
    html = response.data.decode()
    assert f'<p class="field-error" data-field="api_key">{message}' in html
    assert client.get("/").status_code == 302  # still signed out


def test_a_revoked_key_signs_its_browsers_out(browser, db):
    assert browser.get("/").status_code == 200
    with db.orm_write() as s:
        s.execute(update(ApiKey).values(revoked_at=utcnow()))

    response = browser.get("/")

    assert response.status_code == 302 and response.headers["Location"].startswith("/signin")
    assert browser.get("/signin").status_code == 200  # the sign-in page, not a redirect: signed out
    assert sign_in(browser, browser.key).status_code == 400  # and the key no longer signs in


def test_sign_out_is_a_post_with_csrf(browser):
    assert browser.post("/signout").status_code == 400  # no token: refused, still signed in
    assert browser.get("/").status_code == 200

    response = submit(browser, "/signout", page="/")

    assert response.status_code == 302 and response.headers["Location"] == "/signin"
    assert browser.get("/").status_code == 302
    assert browser.get("/signout").status_code == 405


@pytest.mark.parametrize("path", ["/", "/new/chat", "/new/image", "/new/finetune", "/sessions/1", "/admin"])
def test_a_signed_out_visitor_is_sent_to_sign_in(client, path):
    response = client.get(path)
    assert response.status_code == 302 and response.headers["Location"] == f"/signin?next={path}"


@pytest.mark.parametrize("path", ["/sessions/1/events", "/sessions/1/state", "/sessions/1/files/1"])
def test_what_a_page_fetches_is_401_when_signed_out(client, path):
    response = client.get(path)
    assert response.status_code == 401 and response.mimetype == "text/html"


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"])
def test_sign_in_never_redirects_off_site(client, make_key, target):
    response = sign_in(client, make_key(), next_path=target)
    assert response.status_code == 302 and response.headers["Location"] == "/"


def test_a_form_post_without_a_valid_token_is_a_400_page(browser, db):
    form = {"model_name": TEXT_MODEL, "message": "hi"}
    for data in (form, {**form, "csrf_token": "forged"}):
        response = browser.post("/new/chat", data=data)
        assert response.status_code == 400 and response.mimetype == "text/html"
        assert b"CSRF" in response.data
    with db.orm_read() as s:
        assert s.scalars(select(Task)).all() == []


def test_the_json_api_takes_no_cookie_and_needs_no_csrf_token(browser):
    assert browser.get("/api/v1/sessions").status_code == 401  # signed in by cookie, but no Bearer
    created = browser.post("/api/v1/sessions", headers=bearer(browser.key),
                           json={"model_name": TEXT_MODEL, "message": "hi"})
    assert created.status_code == 201, created.json


def test_signing_in_starts_a_fresh_cookie(client, make_key):
    before = csrf_of(client, "/signin")  # a visitor's token, from before signing in
    assert sign_in(client, make_key("bob")).status_code == 302
    page = client.get("/").data.decode()
    assert "bob" in page and csrf_of(page) != before
    assert client.get("/signin").headers["Location"] == "/"  # signed in already: nothing to do there


def test_a_sign_in_lasts_sign_in_hours_however_busy_the_browser(browser, monkeypatch):
    from helix_api.web import signin

    now = signin.time.time()
    monkeypatch.setattr(signin.time, "time", lambda: now + 11.9 * 3600)
    assert browser.get("/").status_code == 200  # still in, and this request re-signed the cookie
    monkeypatch.setattr(signin.time, "time", lambda: now + 12.1 * 3600)
    response = browser.get("/")
    assert response.status_code == 302 and response.headers["Location"] == "/signin?next=/"
