"""Schemathesis against a real API (an HTTP server on loopback, SQLite and PostgreSQL): every operation of
/api/v1/openapi.json with valid and invalid input. No request may get a 5xx or hang, and a refused request
(4xx) changes no row. Bounded: HELIX_FUZZ_EXAMPLES cases per operation and mode (default 25)."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from sqlalchemy import func, select
from werkzeug.serving import make_server

from helix_api.accounts.auth import create_runner_token, create_user
from helix_api.models import ApiKey, File, Interaction, Runner, RunnerToken, Session, Task, TaskEvent, User
from tests.conftest import IMAGE_MODEL, TEXT_MODEL, bearer

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("HELIX_FUZZ_EXAMPLES", "50"))
TIMEOUT = 30  # seconds: a request still unanswered by then has hung
_TABLES = (User, ApiKey, RunnerToken, Session, Interaction, Task, TaskEvent, File, Runner)


def _rows(db) -> tuple[int, ...]:
    with db.orm_read() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in _TABLES)


@pytest.fixture
def fuzz_settings(settings):
    # Waits stay short so that a fuzzed long poll or a chat no runner answers cannot stall the run.
    settings.update(MAX_WAIT_SECONDS=1, OPENAI_WAIT_SECONDS=1, SSE_KEEPALIVE_SECONDS=0.5)
    return settings


@pytest.fixture
def server(fuzz_settings, app) -> Iterator[str]:
    """The app served over real HTTP on loopback, one thread per request."""
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(10)


def _answer_everything(base: str, headers: dict[str, str], stop: threading.Event, v1: threading.Event,
                       answers: Counter[str], busy: threading.Lock) -> None:
    """A runner that completes whatever /v1 queues, so a fuzzed chat or image request gets its answer (an
    unanswered one is a 504 by design, after OPENAI_WAIT_SECONDS). It works only while a /v1 request is in
    flight and counts what it claims, each claim and its complete under `busy`: a request during which it
    claimed a task is not row-checked."""
    http = requests.Session()
    while not stop.is_set():
        if v1.wait(0.2):
            try:
                with busy:
                    _answer_once(http, base, headers, answers)
            except requests.RequestException:
                if not stop.is_set():
                    raise


def _answer_once(http: requests.Session, base: str, headers: dict[str, str], answers: Counter[str]) -> None:
    for type_, model in (("text", TEXT_MODEL), ("image", IMAGE_MODEL)):
        claimed = http.get(f"{base}/api/v1/worker/task", headers=headers, timeout=TIMEOUT,
                           params={"type": type_, "model_name": model, "wait": 0.2})
        if claimed.status_code == 200:
            answers["completed"] += 1  # counted at the claim: its "running" row is written already
            body = claimed.json()
            http.post(f"{base}/api/v1/worker/task/{body['task']['id']}/complete", headers=headers, timeout=TIMEOUT,
                      json={"lease_token": body["lease"]["token"], "result": {"text": "ok", "files": []}})


def test_fuzzing_every_operation_gives_no_5xx_and_refusals_change_nothing(server, db, database_url):
    with db.orm_write() as session:
        _, key = create_user(session, "fuzzer")
        admin, admin_key = create_user(session, "fuzz-admin", is_admin=True)
        token = create_runner_token(session, "fuzz-runner")
    user, runner, admin = bearer(key), bearer(token), bearer(admin_key)
    http = requests.Session()
    # Something to find: a session with a completed reply, so ids 1 and up lead somewhere.
    created = http.post(f"{server}/api/v1/sessions", headers=user, json={"model_name": TEXT_MODEL, "message": "hi"})
    assert created.status_code == 201, created.text
    held = http.get(f"{server}/api/v1/worker/task", headers=runner, params={"model_name": TEXT_MODEL}).json()
    done = http.post(f"{server}/api/v1/worker/task/{held['task']['id']}/complete", headers=runner,
                     json={"lease_token": held["lease"]["token"], "result": {"text": "hello"}})
    assert done.status_code == 200, done.text

    schema = schemathesis.openapi.from_dict(http.get(f"{server}/api/v1/openapi.json").json())
    stop, v1, answers, busy = threading.Event(), threading.Event(), Counter(), threading.Lock()
    with db.orm_write() as session:
        answering = bearer(create_runner_token(session, "answers-v1"))
    _answer_once(http, server, answering, answers)  # its runner row exists before any request is checked
    helper = threading.Thread(target=_answer_everything, args=(server, answering, stop, v1, answers, busy),
                              daemon=True)
    helper.start()
    seen: Counter[str] = Counter()
    server_errors: list[str] = []

    def send(case) -> None:
        path = case.operation.path
        headers = runner if path.startswith("/api/v1/worker") else admin if "/admin/" in path else user
        if path.endswith("/events") and case.method == "GET":
            case.query = {**(case.query or {}), "follow": "0"}  # a followed stream is open by design
        if isinstance(case.body, dict) and "stream" in case.body:
            case.body["stream"] = False
        with busy:  # the helper's work lies wholly before these counts, or is counted after them
            before, completed = _rows(db), answers["completed"]
        if path.startswith("/v1/") and case.method == "POST":
            v1.set()
        try:
            response = case.call(base_url=server, session=http, headers=headers, timeout=TIMEOUT)
        except requests.Timeout:
            pytest.fail(f"hung: {case.method} {case.formatted_path} ({TIMEOUT} s without an answer)")
        finally:
            v1.clear()
        seen[str(response.status_code)[0] + "xx"] += 1
        if response.status_code >= 500:
            server_errors.append(f"{response.status_code} {case.method} {case.formatted_path}: {response.text[:300]}")
        elif response.status_code >= 400:
            with busy:
                after, helped = _rows(db), answers["completed"] != completed
            if helped:  # the helper claimed meanwhile: what changed is its work, not this request's
                return
            changed = {m.__tablename__: (b, a) for m, b, a in zip(_TABLES, before, after, strict=True) if a != b}
            assert not changed, f"{case.method} {case.formatted_path} -> {response.status_code} changed {changed}: " \
                                f"{response.text[:200]}"

    for operation in schema.get_all_operations():
        operation = operation.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                send(case)

            try:
                fuzz()
            except Unsatisfiable:  # an operation with nothing to get wrong (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE
    stop.set()
    helper.join(TIMEOUT)
    total = sum(seen.values())
    dialect = database_url.split(":", 1)[0].split("+")[0]
    print(f"\nfuzz {dialect}: {total} requests, {seen['5xx']} 5xx, by class {dict(sorted(seen.items()))}")
    assert not server_errors, "\n".join(server_errors[:20])
    assert total >= EXAMPLES * 10
