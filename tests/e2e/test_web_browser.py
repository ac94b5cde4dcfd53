"""The web app in a real browser: Chromium (Playwright) against `helix serve` and runners on the tiny models.

The web app's behaviour does not depend on the database, so these run on SQLite only. A failing test
leaves a screenshot of every open page under test-artifacts/screenshots/ (see the conftest).
Every page is also checked at a desktop's and a phone's width (fits, nav usable, axe-core) against one
server and one browser context for the whole module, so the checks add seconds, not minutes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import TEXT_MODEL, bearer
from tests.e2e.browser import axe_violations, nav_problems, sideways_scroll
from tests.e2e.client import create_finetune, create_session, get_session, reply_of
from tests.e2e.processes import CLAIM_PARAMS, ApiServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WAIT_MS = 120_000  # a runner loading a tiny model on a shared 2-core machine

# Installed before the page's own script: records (text length, phase) of the open reply at every change,
# so a test can tell what the page showed along the way, however fast the model is.
RECORD_REPLY = """
window.__snapshots = [];
document.addEventListener("DOMContentLoaded", () => {
  const reply = document.querySelector("[data-live-reply]");
  if (!reply) return;
  const output = reply.querySelector(".output");
  const label = reply.querySelector(".phase");
  const record = () => window.__snapshots.push(
    {length: output.textContent.length, phase: label.dataset.phase, t: performance.now()});
  new MutationObserver(record).observe(reply, {subtree: true, childList: true, characterData: true,
                                               attributes: true, attributeFilter: ["data-phase"]});
});
"""


@pytest.fixture
def e2e_database(tmp_path: Path) -> str:
    """SQLite only, in place of the conftest's pair: the web app's behaviour does not depend on the database."""
    return f"sqlite:///{tmp_path / 'helix.db'}"


@pytest.fixture
def web_api(api_server: Callable[..., ApiServer], tiny_mistral: Path, tiny_sdxl: Path) -> ApiServer:
    """The API offering the tiny text and image models."""
    return api_server(models=f"text:{tiny_mistral},image:{tiny_sdxl}")


@pytest.fixture
def new_page(chromium) -> Iterator[Callable[[], Any]]:
    """`new_page()`: a page in a fresh browser context (its own cookies), closed after the test."""
    contexts = []

    def make():
        context = chromium.new_context()
        context.set_default_timeout(30_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


def sign_in(page, server: ApiServer, key: str, path: str = "/") -> None:
    """Open `path`, get sent to sign in, sign in with `key`, land back on `path`."""
    page.goto(f"{server.url}{path}")
    assert "/signin" in page.url
    page.fill("input[name=api_key]", key)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{server.url}{path}")


def test_sign_in_and_out(web_api, new_page):
    page = new_page()
    page.goto(f"{web_api.url}/")
    assert page.url == f"{web_api.url}/signin?next=/"

    page.fill("input[name=api_key]", "hx_wrong")
    page.click("button:has-text('Sign in')")
    assert page.inner_text(".field-error[data-field=api_key]") == "Unknown or revoked API key."

    page.fill("input[name=api_key]", web_api.api_key)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{web_api.url}/")
    assert page.inner_text("header .who") == "alice"
    assert page.inner_text("h1") == "Your sessions"

    page.click("button:has-text('Sign out')")
    page.wait_for_url(f"{web_api.url}/signin")
    page.goto(f"{web_api.url}/new/chat")
    assert "/signin?next=/new/chat" in page.url


def test_a_chat_streams_its_reply_into_the_page(web_api, new_page, text_runner, tiny_mistral):
    text_runner(web_api, "create", tiny_mistral, "chat")
    page = new_page()
    page.add_init_script(RECORD_REPLY)
    sign_in(page, web_api, web_api.api_key, "/new/chat")
    page.select_option("select[name=model_name]", Path(tiny_mistral).name)  # offered by its alias
    page.fill("textarea[name=message]", "Tell me a long story about a dragon.")
    page.click("summary:has-text('Advanced')")
    page.fill("input[name=max_new_tokens]", "200")
    page.fill("input[name=seed]", "5")
    page.click("button:has-text('Send')")
    page.wait_for_url(f"{web_api.url}/sessions/*")

    page.wait_for_selector(".reply .phase[data-phase=complete]", timeout=WAIT_MS)

    session_id = int(page.url.rsplit("/", 1)[1])
    reply = reply_of(get_session(web_api, web_api.user, session_id))
    assert reply["state"] == "complete" and reply["output"]
    shown = page.eval_on_selector(".reply .output", "el => el.textContent")
    assert shown == reply["output"]
    snapshots = page.evaluate("window.__snapshots")
    final = len(reply["output"])
    partial = [s for s in snapshots if 0 < s["length"] < final and s["phase"] == "generating"]
    assert partial, f"the text never showed part-way, before completion: {snapshots}"
    completed_at = min(s["t"] for s in snapshots if s["phase"] == "complete")
    assert min(s["t"] for s in partial) < completed_at
    assert page.is_visible("form.continue") and not page.is_visible("form.cancel")


def test_an_image_session_shows_its_image(web_api, new_page, image_runner, tiny_sdxl):
    image_runner(web_api, "create", tiny_sdxl, "draw")
    page = new_page()
    sign_in(page, web_api, web_api.api_key, "/new/image")
    page.select_option("select[name=model_name]", Path(tiny_sdxl).name)  # offered by its alias
    page.fill("textarea[name=message]", "a red fox in the snow")
    page.fill("input[name=width]", "96")
    page.fill("input[name=height]", "64")
    page.fill("input[name=num_inference_steps]", "3")
    page.fill("input[name=num_images]", "1")
    page.fill("input[name=seed]", "4")
    page.click("button:has-text('Draw')")
    page.wait_for_url(f"{web_api.url}/sessions/*")

    page.wait_for_function("() => { const img = document.querySelector('.reply .files img');"
                           " return img && img.complete && img.naturalWidth > 0; }", timeout=WAIT_MS)

    size = page.eval_on_selector(".reply .files img", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [96, 64]
    assert page.get_attribute(".reply .phase", "data-phase") == "complete"


def test_a_bad_training_file_shows_its_lines_next_to_the_field(web_api, new_page, tiny_mistral):
    lines = [json.dumps({"question": f"What is {n}?", "answer": f"{n}."}) for n in range(12)]
    lines[3] = '{"messages": [{"role": "robot", "content": "beep"}]}'
    page = new_page()
    sign_in(page, web_api, web_api.api_key, "/new/finetune")
    page.select_option("select[name=type]", "text")
    page.select_option("select[name=model_name]", Path(tiny_mistral).name)  # offered by its alias
    page.set_input_files("input[name=files]", files=[
        {"name": "chats.jsonl", "mimeType": "application/jsonl", "buffer": "\n".join(lines).encode()}])
    page.click("button:has-text('Upload and train')")

    error = page.wait_for_selector(".field-error[data-field=files]")
    assert error.inner_text() == "The training data has problems:"
    assert page.inner_text("ul.problems li") == "chats.jsonl:4 messages[0] has unknown role 'robot' " \
                                                "(allowed: system, user, assistant)"
    # The error sits by the file field: the next element after the field's label.
    assert page.evaluate("document.querySelector('input[name=files]').closest('label').nextElementSibling"
                         ".dataset.field") == "files"
    listing = requests.get(f"{web_api.url}/api/v1/sessions", headers=web_api.user, timeout=30).json()
    assert listing["sessions"] == []


def test_someone_elses_session_is_a_404_page(web_api, new_page):
    session_id = create_session(web_api, web_api.user, "my secret")["id"]
    mine = new_page()
    sign_in(mine, web_api, web_api.api_key, f"/sessions/{session_id}")
    assert "my secret" in mine.inner_text(".thread")

    bob = web_api.create_user("bob")
    page = new_page()
    sign_in(page, web_api, bob)
    shown = page.goto(f"{web_api.url}/sessions/{session_id}")

    assert shown.status == 404
    assert page.inner_text("h1") == "404 · Not found" and "my secret" not in page.content()
    assert page.goto(f"{web_api.url}/sessions/{session_id}/state").status == 404
    assert requests.get(f"{web_api.url}/api/v1/sessions/{session_id}", headers=bearer(bob),
                        timeout=30).status_code == 404


class FakeRunner:
    """The worker API driven by the test, so each step of a reply is seen on the page one at a time."""

    def __init__(self, server: ApiServer) -> None:
        self.url = f"{server.url}/api/v1/worker"
        self.headers = {**server.runner_headers, "X-Helix-Runner": "test-hand"}
        self.seq = 0

    def claim(self, mode: str = "create", **filters: str) -> tuple[int, str]:
        response = requests.get(f"{self.url}/task", headers=self.headers, timeout=30,
                                params={**CLAIM_PARAMS, "mode": mode, **filters})
        assert response.status_code == 200, response.text
        self.seq = 0
        return response.json()["task"]["id"], response.json()["lease"]["token"]

    def post(self, task: tuple[int, str], action: str, **body: Any) -> dict[str, Any]:
        response = requests.post(f"{self.url}/task/{task[0]}/{action}", headers=self.headers, timeout=30,
                                 json={"lease_token": task[1], **body})
        assert response.status_code == 200, response.text
        return response.json()

    def events(self, task: tuple[int, str], *events: dict[str, Any]) -> None:
        numbered = []
        for event in events:
            self.seq += 1
            numbered.append({"seq": self.seq, **event})
        self.post(task, "events", events=numbered)


def phase_of(page) -> str:
    return page.get_attribute(".reply:last-child .phase", "data-phase")


def wait_phase(page, phase: str, text: str | None = None) -> None:
    """Wait until the page shows `phase` (and, if given, exactly `text` as the label)."""
    selector = f".reply:last-child .phase[data-phase={phase}]"
    if text is None:
        page.wait_for_selector(selector)
    else:
        page.wait_for_function("([s, t]) => document.querySelector(s)?.textContent === t", arg=[selector, text])


def output_of(page) -> str:
    return page.eval_on_selector(".reply:last-child .output", "el => el.textContent")


def test_the_page_shows_every_phase_of_a_reply(api_server, new_page):
    server = api_server()
    runner = FakeRunner(server)
    ahead = create_session(server, server.user, "first in line")
    mine = create_session(server, server.user, "second in line")
    page = new_page()
    sign_in(page, server, server.api_key, f"/sessions/{mine['id']}")
    wait_phase(page, "queued", "queued (2 in line)")

    first = runner.claim()  # the session ahead leaves the queue: polling moves this one up
    wait_phase(page, "queued", "queued (1 in line)")
    # The runner is live now, so the reply says when it should start, beside its place in line.
    page.wait_for_function("() => (document.querySelector('.reply:last-child .estimate')?.textContent || '')"
                           ".startsWith('starts in about')")
    task = runner.claim()
    wait_phase(page, "loading")
    runner.events(task, {"kind": "token", "text": "Hel"}, {"kind": "token", "text": "lo"})
    wait_phase(page, "generating")
    page.wait_for_function("() => document.querySelector('.reply:last-child .output').textContent === 'Hello'")

    runner.post(task, "fail", error="runner lost its GPU", retry=True)  # requeued: the partial text goes
    wait_phase(page, "queued", "queued (1 in line)")
    assert output_of(page) == ""
    task = runner.claim()
    wait_phase(page, "loading")
    runner.events(task, {"kind": "token", "text": "Hi"})
    page.wait_for_function("() => document.querySelector('.reply:last-child .output').textContent === 'Hi'")
    assert not page.is_visible("form.continue") and page.is_visible("form.cancel")
    runner.post(task, "complete", result={"text": "Hi!"})
    wait_phase(page, "complete")
    assert output_of(page) == "Hi!"
    assert page.is_visible("form.continue") and not page.is_visible("form.cancel")

    runner.post(first, "fail", error="CUDA error: device-side assert triggered", retry=False)
    page.goto(f"{server.url}/sessions/{ahead['id']}")
    assert phase_of(page) == "error"
    assert page.inner_text(".reply:last-child pre.error") == "CUDA error: device-side assert triggered"


def test_the_page_follows_training_and_then_chats(api_server, new_page):
    server = api_server()
    runner = FakeRunner(server)
    lines = "\n".join(json.dumps({"question": f"What is {n}?", "answer": f"{n}."}) for n in range(10))
    created = create_finetune(server, TEXT_MODEL, [("files", ("qa.jsonl", lines.encode(), "application/jsonl"))])
    page = new_page()
    sign_in(page, server, server.api_key, f"/sessions/{created['id']}")
    wait_phase(page, "queued")
    assert not page.is_visible("form.continue")

    task = runner.claim(mode="finetune")
    wait_phase(page, "loading")
    runner.events(task, {"kind": "progress", "step": 1, "total": 4, "loss": 0.9})
    wait_phase(page, "training")
    page.wait_for_function("() => document.querySelector('.reply:last-child .progress-detail').textContent"
                           " === 'step 1 of 4 · loss 0.9000'")
    assert page.eval_on_selector(".reply:last-child progress", "p => [p.value, p.max, p.hidden]") == [1, 4, False]

    uploaded = requests.post(f"{runner.url}/task/{task[0]}/files", headers=runner.headers, timeout=30,
                             data={"lease_token": task[1], "kind": "adapter"},
                             files={"file": ("adapter.zip", b"PK\x05\x06" + b"\x00" * 18, "application/zip")})
    assert uploaded.status_code == 201, uploaded.text
    runner.post(task, "complete", result={"text": "trained", "adapter_file_id": uploaded.json()["file"]["id"]})
    wait_phase(page, "complete")
    assert page.is_visible("form.continue")  # the session switched to inference: chat with the adapter

    page.fill("form.continue textarea[name=message]", "What is 3?")
    page.click("form.continue button:has-text('Send')")
    wait_phase(page, "queued", "queued (1 in line)")
    assert requests.get(f"{runner.url}/task", headers=runner.headers, timeout=30,
                        params=CLAIM_PARAMS).json()["task"]["adapter"] is not None


# Every page at a desktop's and a phone's width: no sideways scroll, the nav usable, no serious axe-core finding.

VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
# A model named by a long path, as an operator's HELIX_MODELS may name one: pages must wrap it, not widen.
# A long hub-style name (a path would be shown by its directory's name, its alias): slashes to break at.
LONG_MODEL = "helix-operators/checkouts/stable-diffusion-xl/tiny-sdxl-for-the-layout-checks-of-phones"
ADMIN = "ada-lovelace"  # an admin: the nav's longest form, with Admin and a longer name


@dataclass
class Site:
    """One server for the page checks, holding a session of each kind, and an admin's key."""

    server: ApiServer
    admin_key: str
    paths: dict[str, str]  # page name -> its path


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 40)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """`helix serve` with a finished chat, a finished image, a failed and a queued task, for the page checks.

    The test drives the real worker API by hand (FakeRunner): what the pages show is what a runner would
    leave, without loading a model.
    """
    root = tmp_path_factory.mktemp("pages")
    server = ApiServer(f"sqlite:///{root / 'helix.db'}", root / "data", root, {"models": f"image:{LONG_MODEL}"},
                       None, lambda path: None)
    try:
        server.migrate()
        server.start()
        admin_key = server.helix("users", "create", ADMIN, "--admin").strip().splitlines()[-1]
        admin = bearer(admin_key)
        hand = FakeRunner(server)
        chat = create_session(server, admin, "Tell me about dragons.", max_new_tokens=96, do_sample=True,
                              temperature=0.7, top_p=1.0, seed=3)
        task = hand.claim()
        hand.events(task, {"kind": "token", "text": "Dragons "})
        hand.post(task, "complete", result={"text": "Dragons are large, winged and made up."})
        image = create_session(server, admin, "a red fox in the snow", model=LONG_MODEL, type_="image",
                               width=64, height=64, num_inference_steps=4, seed=1)
        task = hand.claim(type="image", model_name=LONG_MODEL)
        uploaded = requests.post(f"{hand.url}/task/{task[0]}/files", headers=hand.headers, timeout=30,
                                 data={"lease_token": task[1], "kind": "output"},
                                 files={"file": ("fox-0.png", _png(), "image/png")})
        assert uploaded.status_code == 201, uploaded.text
        hand.post(task, "complete", result={"files": [uploaded.json()["file"]["id"]]})
        create_session(server, admin, "This one fails.")
        hand.post(hand.claim(), "fail", error="CUDA out of memory. " * 12, retry=False)
        create_session(server, admin, "This one waits.")  # queued: the admin page's queue table has a row
        yield Site(server, admin_key, {
            "sign-in": "/signin", "sessions": "/", "chat": f"/sessions/{chat['id']}", "new chat": "/new/chat",
            "new image": "/new/image", "image session": f"/sessions/{image['id']}", "fine-tune": "/new/finetune",
            "usage": "/usage", "admin": "/admin", "docs": "/docs", "404": "/sessions/999999"})
    finally:
        server.dispose()


@pytest.fixture(scope="module")
def tabs(chromium, site: Site) -> Iterator[dict[bool, Any]]:
    """Two pages for the whole module: {True: one signed in as the admin, False: one signed out}."""
    signed_in, signed_out = chromium.new_context(), chromium.new_context()
    pages = {True: signed_in.new_page(), False: signed_out.new_page()}
    for page in pages.values():
        page.set_default_timeout(30_000)
    sign_in(pages[True], site.server, site.admin_key)
    yield pages
    signed_in.close()
    signed_out.close()


@pytest.mark.parametrize("viewport", VIEWPORTS)
@pytest.mark.parametrize("name", ["sign-in", "sessions", "chat", "new chat", "new image", "image session",
                                  "fine-tune", "usage", "admin", "docs", "404"])
def test_every_page_fits_the_screen_keeps_its_nav_usable_and_passes_axe(site, tabs, name, viewport):
    page = tabs[name != "sign-in"]
    page.set_viewport_size(VIEWPORTS[viewport])
    shown = page.goto(f"{site.server.url}{site.paths[name]}")
    assert shown.status == (404 if name == "404" else 200)
    page.wait_for_load_state("load")  # images and styles in: widths are final

    assert sideways_scroll(page) is None, sideways_scroll(page)
    items = page.locator("header.top a, header.top button, header.top .who").all_inner_texts()
    if name == "sign-in":
        assert items == ["Helix"]
    else:
        assert items == ["Helix", "Sessions", "New chat", "New image", "Fine-tune", "Usage", "Admin", ADMIN, "Sign out"]
    assert nav_problems(page) == []
    assert axe_violations(page) == []


def test_a_long_model_name_wraps_at_its_slashes_on_a_phone_not_a_letter_a_line(site, tabs):
    page = tabs[True]
    page.set_viewport_size(VIEWPORTS["phone"])
    page.goto(f"{site.server.url}/")
    cell = page.locator(f'td.model[data-model="{LONG_MODEL}"]')
    lines = cell.evaluate("""td => {
      const range = document.createRange();
      range.selectNodeContents(td);
      return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
    }""")
    assert 1 < lines <= 4, f"{len(LONG_MODEL)} characters took {lines} lines"
    assert cell.inner_text() == LONG_MODEL  # the <wbr>s add break points, not characters


def test_a_chat_message_folds_its_params_and_shows_only_those_changed(site, tabs):
    page = tabs[True]
    page.set_viewport_size(VIEWPORTS["desktop"])
    page.goto(f"{site.server.url}{site.paths['chat']}")
    params = page.locator(".turn.user details.params")
    assert params.locator("summary").inner_text() == "4 params changed from the defaults"  # top_p=1.0 is one
    assert not params.locator("dl").is_visible()  # folded until asked for
    params.locator("summary").click()
    assert params.locator("dl").inner_text().split() == ["max_new_tokens", "96", "do_sample", "true", "temperature",
                                                         "0.7", "seed", "3"]


def test_the_admin_page_refreshes_its_figures_in_place(site, tabs):
    page = tabs[True]
    page.goto(f"{site.server.url}/admin")
    queued = f'tr[data-model="{TEXT_MODEL}"] td.queued'
    before = int(page.inner_text(queued))
    page.evaluate("window.__notReloaded = true")
    create_session(site.server, bearer(site.admin_key), "One more in line.")

    page.wait_for_function("([s, n]) => document.querySelector(s)?.textContent === String(n)",
                           arg=[queued, before + 1], timeout=15_000)  # within one 5 s tick, on a busy machine
    assert page.evaluate("window.__notReloaded") is True  # swapped in: the page kept its state
    assert page.is_checked("[data-refresh-toggle]")
