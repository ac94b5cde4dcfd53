"""End-to-end fixtures: `helix serve` and `helix-runner` as real processes talking real HTTP.

The processes themselves live in tests/e2e/processes.py, the client's calls in tests/e2e/client.py and the
browser in tests/e2e/browser.py; tests import helpers from there and take these fixtures as arguments.
Every process logs to a file under the test's tmp_path; a failing test shows those logs in its report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.browser import launch_chromium, screenshot_pages
from tests.e2e.processes import ApiServer, RunnerProcess, start_runner

LOGS = pytest.StashKey[list[Path]]()


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


# The API.


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
                "extra_params": "sleep,token_delay,token_progress"}

    def start(workers: int | None = None, **settings: Any) -> ApiServer:
        server = ApiServer(e2e_database, tmp_path / "data", tmp_path, {**defaults, **settings}, workers,
                           lambda path: _track_log(request, path))
        if servers:  # a replica: another user, as its first start makes one
            server.user_name = f"alice-{len(servers) + 1}"
        servers.append(server)
        server.migrate()
        server.start()
        return server

    yield start
    for server in servers:
        server.dispose()


@pytest.fixture
def text_api(api_server: Callable[..., ApiServer], tiny_mistral: Path) -> ApiServer:
    """The API offering the tiny Mistral (by its path) as a text model."""
    return api_server(models=f"text:{tiny_mistral}")


@pytest.fixture
def image_api(api_server: Callable[..., ApiServer], tiny_sdxl: Path) -> ApiServer:
    """The API offering the tiny SDXL pipeline (by its path) as an image model."""
    return api_server(models=f"image:{tiny_sdxl}")


# Runners.


@pytest.fixture
def runner_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., RunnerProcess]]:
    """Start `helix-runner` against a server with its runner token: `runner_process(server, "runner-a", ...)`.

    The keyword arguments are `start_runner`'s (tests/e2e/processes.py): `backend=`, `max_tasks=`, `extra=`...
    """
    runners: list[RunnerProcess] = []

    def start(server: ApiServer, name: str, **options: Any) -> RunnerProcess:
        log = tmp_path / f"runner-{name}.log"
        _track_log(request, log)
        runner = start_runner(server, name, log, tmp_path / f"cache-{name}", **options)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop()


def _model_runner(runner_process: Callable[..., RunnerProcess], type_: str,
                  default_backend: str) -> Callable[..., RunnerProcess]:
    def start(server: ApiServer, mode: str, model: Path | str, name: str | None = None, *,
              backend: str = default_backend, max_parallel: int | str | None = None,
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


# A browser for the web app's tests, and a screenshot of every page open when a test fails.


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's Browser) for one test module, so no browser outlives its tests;
    skipped without one, a failure under CI=true."""
    with launch_chromium() as browser:
        yield browser


@pytest.hookimpl(hookwrapper=True, specname="pytest_runtest_makereport")
def pytest_runtest_makereport_screenshots(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    browser = getattr(item, "funcargs", {}).get("chromium")
    if not report.failed or browser is None:
        return
    shots = screenshot_pages(browser, f"{item.name}-{report.when}")
    report.sections.append((f"{report.when}: screenshots", "\n".join(shots) or "(no page was open)"))
