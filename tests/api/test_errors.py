"""Errors in the asker's language: HTML for a browser's pages, JSON under /api, OpenAI's shape under /v1;
and input quoted back in a message cut at a safe length."""

from __future__ import annotations

import pytest

from helix_api.errors import ECHO_CHARS, echo
from tests.conftest import TEXT_MODEL

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
PROGRAM = {"Accept": "*/*"}  # curl's, and what requests and httpx send

# (method, path) of a 404 and a 405 in each part of the site, and the 404 of an endpoint /v1 lacks.
NOT_FOUND = {"page": ("GET", "/nope"), "api": ("GET", "/api/v1/nope"), "v1": ("GET", "/v1/nope")}
WRONG_METHOD = {"page": ("POST", "/usage"), "api": ("DELETE", "/api/v1/models"), "v1": ("DELETE", "/v1/models")}


def _html_page(response, status: int) -> str:
    assert response.status_code == status and response.mimetype == "text/html", response.data[:300]
    html = response.data.decode()
    # The app's own page: its stylesheet, its error section, and the hardening every page has.
    assert '<link rel="stylesheet" href="/assets/helix.css">' in html
    assert f'<section class="error-page" data-status="{status}">' in html
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    return html


def _native(response, status: int, code: str) -> str:
    assert response.status_code == status and response.mimetype == "application/json", response.data[:300]
    assert set(response.json) == {"error", "message"} and response.json["error"] == code
    return response.json["message"]


def _openai(response, status: int, code: str) -> str:
    assert response.status_code == status and response.mimetype == "application/json", response.data[:300]
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code
    return error["message"]


@pytest.mark.parametrize("accept", [BROWSER, PROGRAM], ids=["browser", "program"])
def test_a_404_speaks_the_askers_language(client, accept):
    page = client.get(NOT_FOUND["page"][1], headers=accept)
    if accept is BROWSER:
        assert "There is nothing at /nope." in _html_page(page, 404)
    else:
        assert _native(page, 404, "not_found") == "There is nothing at /nope."
    # Under /api and /v1 a browser's Accept changes nothing: their clients read JSON.
    assert "/api/v1/nope" in _native(client.get(NOT_FOUND["api"][1], headers=accept), 404, "not_found")
    assert "/v1/nope" in _openai(client.get(NOT_FOUND["v1"][1], headers=accept), 404, "not_found")


@pytest.mark.parametrize("accept", [BROWSER, PROGRAM], ids=["browser", "program"])
def test_a_405_speaks_the_askers_language_and_names_the_methods_allowed(client, user, accept):
    headers = {**accept, **user}
    method, path = WRONG_METHOD["page"]
    page = client.open(path, method=method, headers=headers)
    if accept is BROWSER:
        assert "POST /usage is not supported; it takes GET." in _html_page(page, 405)
    else:
        assert _native(page, 405, "method_not_allowed") == "POST /usage is not supported; it takes GET."
    assert "GET" in page.headers["Allow"]
    method, path = WRONG_METHOD["api"]
    assert _native(client.open(path, method=method, headers=headers), 405, "method_not_allowed") == (
        "DELETE /api/v1/models is not supported; it takes GET.")
    method, path = WRONG_METHOD["v1"]
    assert _openai(client.open(path, method=method, headers=headers), 405, "method_not_allowed") == (
        "DELETE /v1/models is not supported; it takes GET.")


@pytest.mark.parametrize("method,path", [("POST", "/v1/embeddings"), ("POST", "/v1/completions"),
                                         ("GET", "/v1/assistants"), ("POST", "/v1/audio/speech"), ("GET", "/v1")])
def test_every_v1_path_this_server_lacks_is_an_openai_error_naming_what_is_not_supported(client, user, method,
                                                                                         path):
    for headers in ({**user, **PROGRAM}, {**user, **BROWSER}, {}):
        message = _openai(client.open(path, method=method, headers=headers, json={}), 404, "not_found")
        assert message.startswith(f"{path} is not supported by this server (it serves ")
        assert "/v1/chat/completions" in message and "/v1/models" in message and "<" not in message


def test_a_signed_in_browser_keeps_the_nav_on_a_404_page(app, make_user, client):
    from tests.web.conftest import sign_in

    key = make_user("carol")["Authorization"].removeprefix("Bearer ")
    assert sign_in(client, key).status_code == 302
    html = _html_page(client.get("/no/such/page", headers=BROWSER), 404)
    assert "carol" in html and 'href="/new/chat"' in html and "Sign out" in html


@pytest.fixture
def failing_app(app):
    """The app with a view that fails unexpectedly under each part of the site."""
    def boom():
        raise RuntimeError("a bug")

    for path in ("/boom", "/api/v1/boom", "/v1/boom"):
        app.add_url_rule(path, endpoint=f"boom{path.replace('/', '_')}", view_func=boom)
    return app


def test_a_500_speaks_the_askers_language_and_tells_nothing_of_the_bug(failing_app):
    client = failing_app.test_client()
    html = _html_page(client.get("/boom", headers=BROWSER), 500)
    assert "it has been logged" in html and "a bug" not in html
    assert _native(client.get("/boom", headers=PROGRAM), 500, "internal_error") == "Internal server error."
    assert _native(client.get("/api/v1/boom", headers=BROWSER), 500, "internal_error") == "Internal server error."
    v1 = client.get("/v1/boom", headers=BROWSER)
    assert v1.status_code == 500 and v1.json["error"]["type"] == "server_error"


# Echoed input.


def test_echo_cuts_at_a_word_with_an_ellipsis_and_quotes_short_input_whole():
    assert echo("short") == "'short'" and echo(42) == "42" and echo(None) == "null"
    long = echo("word " * 40)
    assert long.endswith("…'") and len(long) <= ECHO_CHARS + 3 and "wor…" not in long
    assert echo("x" * 500) == repr("x" * ECHO_CHARS + "…")  # no space to cut at: cut at the limit
    assert echo("line\nbreak") == "'line\\nbreak'"  # one line, whatever was sent


FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_a_refusal_quoting_the_request_cuts_it_at_a_safe_length_with_an_ellipsis(client, user):
    response = client.post("/v1/chat/completions", headers=user, json={
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "functions": FUNCTIONS})
    message = _openai(response, 400, "invalid_field")
    quoted, _, why = message.partition("…: ")
    assert why == "the deprecated functions are not supported: send tools."
    assert quoted.startswith('functions=[{"name": "get_weather"') and len(quoted) <= len("functions=") + ECHO_CHARS
    assert quoted.endswith('"type": "object",')  # cut after a whole value, not inside a word


@pytest.mark.parametrize("body,field", [
    ({"mode": "create", "type": "text", "model_name": ["a" * 30] * 20, "message": "hi"}, "model_name"),
    ({"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "hi", "params": {"k" * 300: 1}},
     "params."),
    ({"mode": "create", "type": "text", "model_name": "m" * 300, "message": "hi"}, "model_name"),
])
def test_the_native_api_quotes_long_input_cut_too(client, user, body, field):
    response = client.post("/api/v1/sessions", headers=user, json=body)
    assert response.status_code in (400, 404) and response.json["field"].startswith(field), response.json
    assert "…" in response.json["message"] and len(response.json["message"]) < 400
