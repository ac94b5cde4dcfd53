"""The Helix API under test: a throwaway database, its user key and runner token, and `helix serve`."""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.helix_clients import Http
from bench.processes import ROOT, stop_process

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _console_script(name: str) -> list[str]:
    beside = Path(sys.executable).with_name(name)
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "helix_api.cli.operator"]


class HelixApi:
    """A throwaway database plus `helix serve` on a free loopback port."""

    def __init__(self, backend: str, workdir: Path, args: argparse.Namespace, models: list[str]) -> None:
        self.backend = backend
        self.workdir = workdir / backend
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.pg_db: str | None = None
        self.log_path = self.workdir / "api.log"
        self.banner = ""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["HELIX_MODELS"] = ",".join(f"text:{m}" for m in models)
        env["HELIX_DATA_DIR"] = str(self.workdir / "data")
        self.env = env
        self.key = self.token = ""
        self.threads_note = ""
        self.workers = self.threads = 0

    # database and credentials

    def _pg_admin(self):
        import psycopg

        return psycopg.connect(self.args.pg_admin_url, autocommit=True, connect_timeout=5)

    def setup(self) -> None:
        """Make the database, migrate it, and create a user key and a runner token."""
        if self.backend == "postgres":
            self.pg_db = f"helix_bench_{secrets.token_hex(4)}"
            with self._pg_admin() as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_db}"')
            from sqlalchemy.engine import make_url

            url = make_url(self.args.pg_admin_url).set(drivername="postgresql+psycopg", database=self.pg_db)
            self.env["HELIX_DATABASE_URL"] = url.render_as_string(hide_password=False)
            logger.info("created PostgreSQL database %s", self.pg_db)
        self._cli("db", "upgrade")
        self.key = self._cli("users", "create", f"bench-{secrets.token_hex(3)}")
        self.token = self._cli("runner-token", "create", "--name", "bench")

    def _cli(self, *argv: str) -> str:
        cmd = [*_console_script("helix"), "--log-level", "WARNING", *argv]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        lines = done.stdout.strip().splitlines()
        return lines[-1].strip() if lines else ""

    def teardown(self) -> None:
        """Drop the PostgreSQL database (the SQLite file goes with the work directory)."""
        if self.pg_db:
            try:
                with self._pg_admin() as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
                logger.info("dropped PostgreSQL database %s", self.pg_db)
            except Exception:
                logger.exception("could not drop database %s; drop it by hand", self.pg_db)
            self.pg_db = None

    # server

    def start(self, threads: int | None = None) -> None:
        """Start `helix serve` and wait for /healthz."""
        cmd = [*_console_script("helix"), "--log-level", self.args.api_log_level, "serve",
               "--host", self.host, "--port", str(self.port)]
        if threads:
            cmd += ["--threads", str(threads)]
        if self.args.api_workers:
            cmd += ["--workers", str(self.args.api_workers)]
        self.command = shlex.join(cmd)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"helix serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = Http(self.host, self.port, self.key, timeout=2).request("GET", "/healthz")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"helix serve did not answer /healthz in 60s:\n{self.log_tail()}")
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("Helix API on"):
                self.banner = line.strip()
        logger.info("started: %s  [%s]", self.command, self.banner or "?")
        match = re.search(r"(\d+) process\(es\) x (\d+) threads", self.banner)
        self.workers, self.threads = (int(match[1]), int(match[2])) if match else (0, 0)

    def start_with_threads(self, needed: int) -> None:
        """Start with helix's defaults, or with more threads if a process has fewer than `needed`.

        Every waiting long-poll holds a gunicorn thread; with fewer threads than waiting runners a
        create request queues behind the long-polls until one times out (up to 30 s).
        """
        self.start(self.args.api_threads)
        if not self.args.api_threads and self.threads and self.threads < needed:
            logger.warning("helix serve defaults to %d threads per process, fewer than the %d this run "
                           "keeps busy; restarting it with --threads %d", self.threads, needed, needed)
            self.threads_note = f"--threads raised from the default {self.threads} to {needed}"
            self.stop()
            self.start(needed)

    def stop(self) -> None:
        """Stop the server (gracefully, then by force)."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def user_client(self) -> Http:
        return Http(self.host, self.port, self.key)

    def runner_cfg(self, **extra: Any) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "token": self.token, "key": self.key, **extra}
