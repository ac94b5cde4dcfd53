"""`helix serve` and `helix-runner` as real processes: starting, stopping, waiting and their logs.

The fixtures in tests/e2e/conftest.py build on these; tests import the classes for their type hints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, create_engine, text

from tests.conftest import TEXT_MODEL, bearer

REPO = Path(__file__).resolve().parents[2]
CLAIM_PATH = "/api/v1/worker/task"
CLAIM_PARAMS = {"mode": "create", "type": "text", "model_name": TEXT_MODEL}
# For modules whose behaviour does not depend on the database: `pytestmark = [SQLITE_ONLY, ...]`.
SQLITE_ONLY = pytest.mark.parametrize("e2e_database", ["sqlite"], indirect=True)


def executable(name: str) -> str:
    """A console script of the interpreter running the tests (the project's virtualenv)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    """The tests' environment without HELIX_ settings, with the checkout importable and output unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
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
        self.env = base_env()
        self.env.update({"HELIX_DATABASE_URL": database_url, "HELIX_DATA_DIR": str(data_dir),
                         "HELIX_AUTO_UPGRADE": "false"})
        self.env.update({f"HELIX_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.user_name = "alice"  # a second server on the same database (a replica) needs another
        self.api_key = ""  # the API key of user `user_name`, made at the first start
        self.user: dict[str, str] = {}  # headers with that key
        self.runner_token = ""  # a runner token, made at the first start
        self._log_dir = log_dir
        self._on_log = on_log
        self._engine: Engine | None = None

    def helix(self, *args: str) -> str:
        """Run a `helix` command on this server's database; its stdout."""
        done = subprocess.run([executable("helix"), *args], env=self.env, capture_output=True, text=True,
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
        command = [executable("helix"), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers is not None:
            command += ["--workers", str(self.workers)]
        with log.open("wb") as out:
            # Its own process group, so teardown can take gunicorn's workers down with their master.
            self.proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=REPO, start_new_session=True)
        pending = []
        if self.starts == 1:
            pending = [self._helix_async("users", "create", self.user_name),
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
        return subprocess.Popen([executable("helix"), *args], env=self.env, stdout=subprocess.PIPE,
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
        return stop_process(self.proc, sig)

    def kill(self) -> int:
        """kill -9 the master and its workers at once, as a crashed machine would; the master's exit status."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)

    @property
    def runner_headers(self) -> dict[str, str]:
        """Headers that authenticate as the runner token."""
        return bearer(self.runner_token)

    def job_url(self, mode: str = "Create", type_: str = "Text", model_name: str = TEXT_MODEL) -> str:
        """A runner's HELIX_GET_JOB_URL.

        By default the first design's, verbatim: mixed-case filters in the query string.
        """
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
        stop_process(self.proc, signal.SIGKILL)


def start_runner(server: ApiServer, name: str, log: Path, cache: Path, *,
                 backend: str = "tests.doubles:EchoBackend", wait: float = 2, max_tasks: int | None = None,
                 log_level: str = "INFO", model_name: str = TEXT_MODEL, mode: str = "Create", type_: str = "Text",
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> RunnerProcess:
    """Start `helix-runner` against `server` with its runner token, logging to `log`, its cache at `cache`.

    `extra` are more runner flags; `env` more environment variables.
    """
    env = {**base_env(), **(env or {})}
    env["HELIX_GET_JOB_URL"] = server.job_url(mode, type_, model_name)
    env["HELIX_RUNNER_TOKEN"] = server.runner_token
    env["HELIX_RUNNER_CACHE"] = str(cache)
    command = [sys.executable, "-m", "runner", "--backend", backend, "--runner-name", name,
               "--wait", str(wait), "--log-level", log_level, *extra]
    if max_tasks is not None:
        command += ["--max-tasks", str(max_tasks)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return RunnerProcess(name, proc, log)
