"""End-to-end fixtures: `helix serve` and `helix-runner` as real processes talking real HTTP.

Every process logs to a file under the test's tmp_path; a failing test shows those logs in its report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, create_engine, text

from helix_api.vocabulary import FINAL_INTERACTION_STATES
from tests.conftest import TEXT_MODEL, bearer

REPO = Path(__file__).resolve().parents[2]
LOGS = pytest.StashKey[list[Path]]()
CLAIM_PATH = "/api/v1/worker/task"
CLAIM_PARAMS = {"mode": "create", "type": "text", "model_name": TEXT_MODEL}
# For modules whose behaviour does not depend on the database: `pytestmark = [SQLITE_ONLY, ...]`.
SQLITE_ONLY = pytest.mark.parametrize("e2e_database", ["sqlite"], indirect=True)


# Logs of the processes a test started, attached to its report when it fails.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for path in item.stash.get(LOGS, []):
            try:
                content = path.read_text(errors="replace")
            except OSError as exc:
                content = f"(unreadable: {exc})"
            report.sections.append((f"{report.when}: {path.name}", content[-20_000:] or "(empty)"))


def _track_log(request: pytest.FixtureRequest, path: Path) -> None:
    request.node.stash.setdefault(LOGS, []).append(path)


def _executable(name: str) -> str:
    """A console script of the interpreter running the tests (the project's virtualenv)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal a process we started (continuing it first if it was stopped), kill it if it lingers."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(sig)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        except ProcessLookupError:
            pass
    return proc.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# The API.


class ApiServer:
    """`helix serve` on one database; stop() and start() again keep the database."""

    def __init__(self, database_url: str, data_dir: Path, log_dir: Path, settings: dict[str, Any],
                 workers: int | None, on_log: Callable[[Path], None]) -> None:
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.env = _base_env()
        self.env.update({"HELIX_DATABASE_URL": database_url, "HELIX_DATA_DIR": str(data_dir),
                         "HELIX_AUTO_UPGRADE": "false"})
        self.env.update({f"HELIX_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.api_key = ""  # the API key of user "alice", made at the first start
        self.user: dict[str, str] = {}  # headers with that key
        self.runner_token = ""  # a runner token, made at the first start
        self._log_dir = log_dir
        self._on_log = on_log
        self._engine: Engine | None = None

    def helix(self, *args: str) -> str:
        """Run a `helix` command on this server's database; its stdout."""
        done = subprocess.run([_executable("helix"), *args], env=self.env, capture_output=True, text=True,
                              timeout=60, cwd=REPO)
        assert done.returncode == 0, f"helix {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def migrate(self) -> None:
        """`helix db upgrade`."""
        self.helix("db", "upgrade")

    def start(self, timeout: float = 30.0) -> None:
        """Start serving and wait until /healthz answers.

        The first start also makes a user and a runner token (`api_key`, `user`, `runner_token`) while the server
        boots: each `helix` command costs a second of CPU, and there are two cores to share.
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = self._log_dir / f"api-{self.port}-{self.starts}.log"
        self._on_log(log)
        command = [_executable("helix"), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers is not None:
            command += ["--workers", str(self.workers)]
        with log.open("wb") as out:
            # Its own process group, so teardown can take gunicorn's workers down with their master.
            self.proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=REPO, start_new_session=True)
        pending = []
        if self.starts == 1:
            pending = [self._helix_async("users", "create", "alice"),
                       self._helix_async("runner-token", "create", "--name", "e2e")]

        def healthy() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"helix serve exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(healthy, timeout, f"helix serve on {self.url}", interval=0.1)
        if pending:
            self.api_key, self.runner_token = (self._last_line(proc) for proc in pending)
            self.user = bearer(self.api_key)

    def _helix_async(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([_executable("helix"), *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO)

    @staticmethod
    def _last_line(proc: subprocess.Popen) -> str:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{proc.args} failed:\n{out}\n{err}"
        return out.strip().splitlines()[-1]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop serving (SIGTERM lets gunicorn finish requests in flight); the exit status."""
        if self.proc is None:
            return 0
        return _stop_process(self.proc, sig)

    @property
    def runner_headers(self) -> dict[str, str]:
        """Headers that authenticate as the runner token."""
        return bearer(self.runner_token)

    def job_url(self, mode: str = "Create", type_: str = "Text", model_name: str = TEXT_MODEL) -> str:
        """A runner's HELIX_GET_JOB_URL; by default the seed's, verbatim: mixed-case filters in the query string."""
        return f"{self.url}{CLAIM_PATH}?mode={mode}&type={type_}&model_name={model_name}"

    def create_user(self, name: str) -> str:
        """`helix users create NAME`: the API key."""
        return self.helix("users", "create", name).strip().splitlines()[-1]

    def create_runner_token(self, name: str) -> str:
        """`helix runner-token create --name NAME`: the token."""
        return self.helix("runner-token", "create", "--name", name).strip().splitlines()[-1]

    @property
    def engine(self) -> Engine:
        """An engine on the same database, for the SQL an operator would run."""
        if self._engine is None:
            self._engine = create_engine(self.database_url)
        return self._engine

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Rows of a query on the server's database."""
        with self.engine.connect() as conn:
            return list(conn.execute(text(statement), params))

    def dispose(self) -> None:
        """Kill the process and close the engine."""
        if self.proc is not None:
            # The group outlives a master that is gone while any of its workers lingers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self._engine is not None:
            self._engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def e2e_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty (unmigrated) database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'helix.db'}"
    return request.getfixturevalue("postgres_database")()


@pytest.fixture
def api_server(e2e_database: str, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[..., ApiServer]]:
    """Start `helix serve` on the test's database: `api_server(lease_seconds=3, ...)`.

    Keyword arguments become HELIX_<NAME> settings; `workers=` is passed to `helix serve`.
    """
    servers: list[ApiServer] = []
    # The test doubles' params (tests/doubles.py) are no built-in params: the operator lets them through.
    defaults = {"lease_seconds": 3, "heartbeat_seconds": 1, "reap_seconds": 0.2, "recheck_seconds": 0.2,
                "extra_params": "sleep,token_delay"}

    def start(workers: int | None = None, **settings: Any) -> ApiServer:
        server = ApiServer(e2e_database, tmp_path / "data", tmp_path, {**defaults, **settings}, workers,
                           lambda path: _track_log(request, path))
        servers.append(server)
        server.migrate()
        server.start()
        return server

    yield start
    for server in servers:
        server.dispose()


# Runners.


class RunnerProcess:
    """One `helix-runner` process."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def log_text(self) -> str:
        """Everything it logged so far."""
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float, what: str) -> None:
        """Wait until the runner has logged `text`; `what` names the wait in a failure."""
        wait_for(lambda: text in self.log_text(), timeout, what)

    def signal(self, sig: int) -> None:
        """Send a signal to the runner."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the runner to exit; its status."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"runner {self.name} still running after {timeout}s:\n{self.log_text()[-5000:]}")

    def stop(self) -> None:
        """Stop it for good."""
        _stop_process(self.proc, signal.SIGKILL)


@pytest.fixture
def runner_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., RunnerProcess]]:
    """Start `helix-runner` against a server with its runner token: `runner_process(server, "runner-a", ...)`."""
    runners: list[RunnerProcess] = []

    def start(server: ApiServer, name: str, *, backend: str = "tests.doubles:EchoBackend",
              wait: float = 2, max_tasks: int | None = None, log_level: str = "INFO",
              model_name: str = TEXT_MODEL, mode: str = "Create", type_: str = "Text",
              extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> RunnerProcess:
        """`extra` are more runner flags; `env` more environment variables."""
        log = tmp_path / f"runner-{name}.log"
        _track_log(request, log)
        env = {**_base_env(), **(env or {})}
        env["HELIX_GET_JOB_URL"] = server.job_url(mode, type_, model_name)
        env["HELIX_RUNNER_TOKEN"] = server.runner_token
        env["HELIX_RUNNER_CACHE"] = str(tmp_path / f"cache-{name}")
        command = [sys.executable, "-m", "runner", "--backend", backend, "--runner-name", name,
                   "--wait", str(wait), "--log-level", log_level, *extra]
        if max_tasks is not None:
            command += ["--max-tasks", str(max_tasks)]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        runner = RunnerProcess(name, proc, log)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop()


def _model_runner(runner_process: Callable[..., RunnerProcess], type_: str,
                  default_backend: str) -> Callable[..., RunnerProcess]:
    def start(server: ApiServer, mode: str, model: Path | str, name: str | None = None, *,
              backend: str = default_backend, max_parallel: int | None = None,
              env: dict[str, str] | None = None) -> RunnerProcess:
        extra = ("--device", "cpu") + (("--max-parallel", str(max_parallel)) if max_parallel else ())
        return runner_process(server, name or f"{backend}-{mode}", backend=backend, mode=mode, type_=type_,
                              model_name=str(model), extra=extra, env=env)

    return start


@pytest.fixture
def text_runner(runner_process: Callable[..., RunnerProcess]) -> Callable[..., RunnerProcess]:
    """Start `helix-runner --backend mistral` on CPU: `text_runner(server, "create", tiny_mistral, "chat")`,
    with `backend=`, `max_parallel=` and `env=` where a test needs them."""
    return _model_runner(runner_process, "text", "mistral")


@pytest.fixture
def image_runner(runner_process: Callable[..., RunnerProcess]) -> Callable[..., RunnerProcess]:
    """Start `helix-runner --backend sdxl` on CPU for image tasks of one mode: `image_runner(server, "create",
    tiny_sdxl)`."""
    return _model_runner(runner_process, "image", "sdxl")


@pytest.fixture
def text_api(api_server: Callable[..., ApiServer], tiny_mistral: Path) -> ApiServer:
    """The API offering the tiny Mistral (by its path) as a text model."""
    return api_server(models=f"text:{tiny_mistral}")


@pytest.fixture
def image_api(api_server: Callable[..., ApiServer], tiny_sdxl: Path) -> ApiServer:
    """The API offering the tiny SDXL pipeline (by its path) as an image model."""
    return api_server(models=f"image:{tiny_sdxl}")


# Helpers the tests share: the user API as a client calls it.


def create_session(server: ApiServer, headers: dict[str, str], message: str, *, model: Path | str = TEXT_MODEL,
                   type_: str = "text", http: requests.Session | None = None, **params: Any) -> dict[str, Any]:
    """POST /api/v1/sessions (a chat, or an image with `type_="image"`); the new session."""
    response = (http or requests).post(f"{server.url}/api/v1/sessions", headers=headers, timeout=30,
                                       json={"mode": "create", "type": type_, "model_name": str(model),
                                             "message": message, "params": params})
    assert response.status_code == 201, response.text
    return response.json()


def create_finetune(server: ApiServer, model: Path | str, files: list[tuple[str, tuple[str, bytes, str]]], *,
                    type_: str = "text", **params: Any) -> dict[str, Any]:
    """POST a fine-tune as alice: `files` are the multipart parts, `params` (if any) go as JSON; the new session."""
    data = {"mode": "finetune", "type": type_, "model_name": str(model)}
    if params:
        data["params"] = json.dumps(params)
    response = requests.post(f"{server.url}/api/v1/sessions", headers=server.user, timeout=60, data=data,
                             files=files)
    assert response.status_code == 201, response.text
    return response.json()


def send_message(server: ApiServer, headers: dict[str, str], session_id: int, message: str,
                 **params: Any) -> dict[str, Any]:
    """POST the session's next message; the session."""
    response = requests.post(f"{server.url}/api/v1/sessions/{session_id}/messages", headers=headers, timeout=30,
                             json={"message": message, "params": params})
    assert response.status_code == 201, response.text
    return response.json()


def cancel_session(server: ApiServer, headers: dict[str, str], session_id: int) -> None:
    """POST the session's cancel."""
    response = requests.post(f"{server.url}/api/v1/sessions/{session_id}/cancel", headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def fetch(server: ApiServer, headers: dict[str, str], path: str) -> requests.Response:
    """GET a path of the API (a file's `url`, say) as whoever `headers` authenticate."""
    return requests.get(f"{server.url}{path}", headers=headers, timeout=30)


def openai_client(server: ApiServer, key: str | None = None) -> Any:
    """The official `openai` client on the server's /v1, as alice unless given another key."""
    import openai

    # No retries: each call must succeed or fail on its own.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or server.api_key, max_retries=0, timeout=120)


def get_session(server: ApiServer, headers: dict[str, str], session_id: int) -> dict[str, Any]:
    """GET one session."""
    response = requests.get(f"{server.url}/api/v1/sessions/{session_id}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def reply_of(session: dict[str, Any]) -> dict[str, Any]:
    """The session's last interaction (the reply)."""
    return session["interactions"][-1]


def wait_for_session(server: ApiServer, headers: dict[str, str], session_id: int,
                     check: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict[str, Any]:
    """Poll a session until `check(session)` is truthy; the session then. `what` names the wait in a failure."""
    def ready() -> dict[str, Any] | None:
        session = get_session(server, headers, session_id)
        return session if check(session) else None
    return wait_for(ready, timeout, f"session {session_id}: {what}", interval=0.1)


def wait_for_reply(server: ApiServer, headers: dict[str, str], session_id: int, timeout: float,
                   states: Collection[str] = FINAL_INTERACTION_STATES) -> dict[str, Any]:
    """The last reply of a session once it reaches one of `states` (by default, once it has ended)."""
    session = wait_for_session(server, headers, session_id, lambda s: reply_of(s)["state"] in states, timeout,
                               f"its reply to reach {sorted(map(str, states))}")
    return reply_of(session)


def echo_of(message: str) -> str:
    """What EchoBackend answers to `message`."""
    return " ".join(message.split())


def session_events(server: ApiServer, headers: dict[str, str], session_id: int, *, after: int | None = None,
                   follow: bool = False, until: Callable[[list[dict[str, Any]]], bool] | None = None,
                   timeout: float = 30) -> list[dict[str, Any]]:
    """A session's Server-Sent Events: those stored so far, or with `follow=True` live until `until(events)`.

    `after` is sent as Last-Event-ID, as a reconnecting client does; `timeout` is the longest wait for a byte.
    """
    resume = {"Last-Event-ID": str(after)} if after is not None else {}
    events: list[dict[str, Any]] = []
    with requests.get(f"{server.url}/api/v1/sessions/{session_id}/events", headers={**headers, **resume},
                      params={"follow": "1" if follow else "0"}, stream=True, timeout=(5, timeout)) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for event in read_sse(response):
            events.append(event)
            if until is not None and until(events):
                break
    return events


def read_sse(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Parse a Server-Sent Events stream into {"id", "event", "data"} dicts as they arrive."""
    event: dict[str, Any] = {}
    for raw in response.iter_lines(chunk_size=None, decode_unicode=True):
        line = raw.rstrip("\r") if raw is not None else ""
        if not line:
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data" and "data" in event:
            event["data"] += "\n" + value
        elif key in ("id", "event", "data"):
            event[key] = int(value) if key == "id" else value


# A browser for the web app's tests: Debian's Chromium driven by Playwright, and a screenshot of every
# page open when a test fails (under test-artifacts/screenshots/, named in the test's report).

CHROMIUM = os.environ.get("HELIX_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


def _no_browser(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (under CI=true a missing browser is a failure, not a skip; `make test` installs it)")
    pytest.skip(f"BROWSER TESTS SKIPPED: {reason}")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's Browser) for one test module, so no browser outlives its tests;
    skipped without one, a failure under CI=true."""
    if not os.access(CHROMIUM, os.X_OK):
        _no_browser(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set HELIX_TEST_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _no_browser(f"the playwright package is not installed ({exc})")
    with sync_playwright() as playwright:
        # Playwright's own browser download needs the internet: Debian's Chromium needs nothing.
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.hookimpl(hookwrapper=True, specname="pytest_runtest_makereport")
def pytest_runtest_makereport_screenshots(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    browser = getattr(item, "funcargs", {}).get("chromium")
    if not report.failed or browser is None:
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shots = []
    pages = [page for context in browser.contexts for page in context.pages]
    for index, page in enumerate(pages):
        path = SCREENSHOTS / f"{item.name}-{report.when}-{index}.png".replace("/", "_")
        try:
            page.screenshot(path=str(path), full_page=True)
            shots.append(f"{path} ({page.url})")
        except Exception as exc:  # a page that crashed still lets the others be shot
            shots.append(f"{path}: no screenshot ({exc})")
    report.sections.append((f"{report.when}: screenshots", "\n".join(shots) or "(no page was open)"))
