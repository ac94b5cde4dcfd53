"""Fuzzing what the OpenAPI schema does not describe, on SQLite and PostgreSQL: the web app's form fields
and the names of uploaded files (the web fine-tune form and the JSON API's multipart upload).

Values come from hypothesis: any text, text with NUL and lone surrogates, path separators, huge strings,
beside the valid value, so that a nasty field also reaches the code behind a valid one. Bodies are
encoded by hand (lone surrogates as the bytes a client would send), as a fuzzer over HTTP sends them.
No request may get a 5xx, and a refused one (4xx) stores nothing. Bounded: HELIX_FUZZ_EXAMPLES cases
per form (default 50).
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.test_finetune import chats, counts, png, start_finetune
from tests.conftest import IMAGE_MODEL, TEXT_MODEL
from tests.web.conftest import csrf_of

EXAMPLES = int(os.environ.get("HELIX_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

# Text a person, a browser or a fuzzer may send; lone surrogates (category Cs) included.
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)
NASTY = st.one_of(
    ANY_TEXT,
    st.sampled_from(["a\x00b", "\x00", "\ud800", "a\udfffb", "../../etc/passwd", "..\\..\\boot.ini", "/", "\\",
                     "%00", "\u202egnp.exe", "<script>x</script>", " ", "\t\n", "1e309", "-1", "NaN", "99999999999"]),
    st.builds(lambda piece, n: piece * n, st.sampled_from(["x", "\x00", "é", "/"]), st.integers(300, 70_000)),
)


def _either(valid: str) -> st.SearchStrategy[str]:
    return st.one_of(st.just(valid), NASTY)


def _encoded(text: str) -> bytes:
    """Text as a client puts it on the wire: UTF-8, with lone surrogates as their (invalid) bytes."""
    return text.encode("utf-8", "surrogatepass")


def _form(fields: dict[str, str]) -> bytes:
    return "&".join(f"{quote(_encoded(k))}={quote(_encoded(v))}" for k, v in fields.items()).encode()


def _multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart body by hand (werkzeug's test encoder refuses lone surrogates); its content type."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode()
                + _encoded(value) + b"\r\n")
    for field, filename, content in files:
        # As a browser does: a quote or a line break in a name is escaped, every other byte sent as it is.
        escaped = _encoded(filename).replace(b'"', b"%22").replace(b"\r", b"%0D").replace(b"\n", b"%0A")
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"".encode()
                + escaped + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _check(response, before, db, settings, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.data[:300]!r}"
    if response.status_code >= 400:
        assert counts(db, settings) == before, f"{what}: refused with {response.status_code} yet stored something"


@pytest.fixture
def chat_session(browser) -> int:
    """A chat session of the browser's user, for the form that continues it."""
    token = csrf_of(browser, "/new/chat")
    made = browser.post("/new/chat", data={"csrf_token": token, "model_name": TEXT_MODEL, "message": "hi"})
    assert made.status_code == 302, made.data[:500]
    return int(made.headers["Location"].rstrip("/").rsplit("/", 1)[1])


@pytest.mark.slow
def test_fuzzing_the_web_forms_fields_gives_no_5xx_and_refusals_store_nothing(browser, chat_session, db, settings):
    token = csrf_of(browser, "/new/chat")
    forms = {
        "/new/chat": st.fixed_dictionaries({
            "model_name": _either(TEXT_MODEL), "message": _either("hello"), "max_new_tokens": _either("8"),
            "temperature": _either("0.5"), "top_p": _either("0.9"), "seed": _either("1")}),
        "/new/image": st.fixed_dictionaries({
            "model_name": _either(IMAGE_MODEL), "message": _either("a fox"), "width": _either("64"),
            "height": _either("64"), "num_inference_steps": _either("2"), "num_images": _either("1"),
            "guidance_scale": _either("5"), "seed": _either("1"), "negative_prompt": _either("blurry")}),
        f"/sessions/{chat_session}/messages": st.fixed_dictionaries({
            "message": _either("and then?"), "max_new_tokens": _either("8"), "seed": _either("2")}),
        "/signin": st.fixed_dictionaries({"api_key": NASTY, "next": _either("/")}),
    }
    for path, fields in forms.items():
        _fuzz_form(browser, path, fields, token, db, settings)
    assert browser.get("/").status_code == 200  # no refused sign-in signed the browser out


def _fuzz_form(browser, path: str, fields: st.SearchStrategy[dict[str, str]], token: str, db, settings) -> None:
    @FUZZ
    @given(fields=fields)
    def fuzz(fields: dict[str, str]) -> None:
        before = counts(db, settings)
        response = browser.post(path, data=_form({"csrf_token": token, **fields}),
                                content_type="application/x-www-form-urlencoded")
        _check(response, before, db, settings, f"POST {path} {fields!r:.300}")

    fuzz()


@pytest.mark.slow
def test_fuzzing_uploaded_files_names_gives_no_5xx_and_refusals_store_nothing(make_browser, client, user, db,
                                                                            settings):
    browser = make_browser("uploader")
    token = csrf_of(browser, "/new/finetune")
    name = st.one_of(NASTY, st.builds(lambda text, suffix: text + suffix, NASTY, st.sampled_from([".jsonl", ".png"])))

    @FUZZ
    @given(filename=name, api=st.booleans())
    def fuzz(filename: str, api: bool) -> None:
        before = counts(db, settings)
        files = [("files", filename, chats(12))]
        fields = {"type": "text", "model_name": TEXT_MODEL}
        if api:
            body, content_type = _multipart({"mode": "finetune", **fields}, files)
            response = client.post("/api/v1/sessions", headers=user, data=body, content_type=content_type)
        else:
            body, content_type = _multipart({"csrf_token": token, **fields}, files)
            response = browser.post("/new/finetune", data=body, content_type=content_type)
        _check(response, before, db, settings, f"{'API' if api else 'form'} upload named {filename!r:.300}")

    fuzz()


@pytest.mark.slow
def test_fuzzing_image_uploads_names_gives_no_5xx_and_refusals_store_nothing(client, user, db, settings):
    image = png()

    @FUZZ
    @given(names=st.lists(st.one_of(NASTY, st.builds(lambda t, s: t + s, NASTY, st.sampled_from([".png", ".txt"]))),
                          min_size=1, max_size=4))
    def fuzz(names: list[str]) -> None:
        before = counts(db, settings)
        files = [("files", n, b"a caption" if n.endswith(".txt") else image) for n in names]
        body, content_type = _multipart({"mode": "finetune", "type": "image", "model_name": IMAGE_MODEL}, files)
        response = client.post("/api/v1/sessions", headers=user, data=body, content_type=content_type)
        _check(response, before, db, settings, f"image upload named {names!r:.300}")

    fuzz()


# What the outside fuzzer found, kept as plain tests (fast, on both databases).


def test_a_nul_in_a_web_forms_field_is_a_400_naming_the_field_and_stores_nothing(browser, chat_session, db, settings):
    before = counts(db, settings)
    token = csrf_of(browser, "/new/chat")
    new = browser.post("/new/chat", data={"csrf_token": token, "model_name": TEXT_MODEL, "message": "a\x00b"})
    assert new.status_code == 400 and b'data-field="message">Message must not hold a NUL character' in new.data
    assert b"\x00" not in new.data  # the form comes back without it
    seed = browser.post(f"/sessions/{chat_session}/messages",
                        data={"csrf_token": token, "message": "go on", "seed": "1\x00"})
    assert seed.status_code == 400 and b'data-field="params.seed">Seed must not hold a NUL' in seed.data
    assert counts(db, settings) == before


def test_a_nul_in_an_uploaded_files_name_is_a_400_naming_the_file(client, user, db, settings):
    before = counts(db, settings)
    refused = start_finetune(client, user, [("a\x00b.jsonl", chats(12))])
    assert refused.status_code == 400, refused.json
    assert refused.json["problems"] == [{"file": "a\\u0000b.jsonl", "message": "the file's name holds a NUL character"}]
    assert counts(db, settings) == before


def test_json_nested_past_the_recursion_limit_is_a_bad_line_not_a_500(client, user, db, settings):
    before = counts(db, settings)
    deep = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    refused = start_finetune(client, user, [("deep.jsonl", chats(12) + deep)])
    assert refused.status_code == 400, refused.json
    assert refused.json["problems"] == [{"file": "deep.jsonl", "line": 13,
                                         "message": "not valid JSON (nested too deeply)"}]
    assert counts(db, settings) == before
