"""Web app fixtures: browsers (Flask test clients with their own cookie jars) signed in as users."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from helix_api.accounts.auth import create_user
from helix_api.db import Database

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(page: FlaskClient | bytes | str, path: str = "/signin") -> str:
    """The CSRF token in a page's form: pass the page's HTML, or a client and the path to fetch."""
    if isinstance(page, FlaskClient):
        page = page.get(path).data
    html = page.decode() if isinstance(page, bytes) else page
    match = _CSRF.search(html)
    assert match, f"no CSRF token in:\n{html[:2000]}"
    return match.group(1)


def submit(client: FlaskClient, path: str, data: dict[str, Any] | None = None, *, page: str | None = None,
           **kwargs: Any):
    """POST a form as a browser would: with the CSRF token of the page it is on (`page`, else `path`)."""
    token = csrf_of(client, page or path)
    return client.post(path, data={"csrf_token": token, **(data or {})}, **kwargs)


def sign_in(client: FlaskClient, key: str, next_path: str | None = None):
    """Sign a test client in with an API key; the response."""
    data = {"api_key": key}
    if next_path is not None:
        data["next"] = next_path
    return submit(client, "/signin", data)


@pytest.fixture
def make_key(db: Database) -> Callable[..., str]:
    """Create a user; returns their API key."""
    def make(name: str | None = None, *, admin: bool = False) -> str:
        with db.orm_write() as session:
            _, key = create_user(session, name or f"user-{uuid.uuid4().hex[:8]}", is_admin=admin)
        return key
    return make


@pytest.fixture
def make_browser(app, make_key) -> Callable[..., FlaskClient]:
    """`make_browser("alice")`: a test client signed in as a new user (its key in `.key`)."""
    def make(name: str | None = None, *, admin: bool = False) -> FlaskClient:
        key = make_key(name, admin=admin)
        browser = app.test_client()
        assert sign_in(browser, key).status_code == 302
        browser.key = key
        return browser
    return make


@pytest.fixture
def browser(make_browser) -> FlaskClient:
    """A test client signed in as alice."""
    return make_browser("alice")
