"""Dispatch benchmark: how fast Helix hands a queued task to a runner, and how many it cycles per second.

Run from the repository root with the project's virtualenv:

    .venv/bin/python -m bench.dispatch            # full run (about 4-5 minutes on 2 cores)
    .venv/bin/python -m bench.dispatch --quick    # smaller counts (about 2 minutes)

It measures, against a real `helix serve` subprocess (gunicorn, gthread) on SQLite and on PostgreSQL:

- dispatch latency, "create sent -> claim received": the producer stamps t0 just before it sends
  POST /api/v1/sessions; the runner thread that gets the task stamps t1 when its claim response has
  arrived. Tasks are created one at a time while 1, 10 or 100 runners wait, either long-polling
  (wait=30) or short-polling (wait=0 once a second, each runner at its own random phase). Also
  "create acknowledged -> claim received" (negative when the runner has the task before the creator
  has its 201).
- full-cycle throughput: producers create N sessions as fast as they can while 8 long-polling
  runners claim and complete them; cycles/s = N / (first create sent -> last complete acknowledged).
- API memory: RSS of the gunicorn master and its workers, sampled every 0.5 s (peak).

and puts the same workload through Celery with its Redis broker and result backend (a no-op task
that returns its start time; a prefork worker with 8 processes), printing Helix beside Celery.

Every client here speaks HTTP/1.1 keep-alive with `http.client`, from several processes, so that the
benchmark's own CPU and GIL stay a small share of the 2 cores. See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/dispatch.py` as well as `python -m bench.dispatch`
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.dispatch")

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
REDIS_URL_ENV = "HELIX_BENCH_REDIS_URL"
CELERY_QUEUE = "helix_bench"
STOP_MESSAGE = "__bench_stop__"
CLAIM_PATH = "/api/v1/worker/task"
SESSIONS_PATH = "/api/v1/sessions"
THROUGHPUT_RUNNERS = 8  # the "8 concurrent runners"; Celery gets --concurrency 8 to match
SHORT_POLL_PERIOD = 1.0

TARGETS = {
    "lp_p50_ms": 2.0,  # long-poll p50 with 100 runners waiting
    "lp_p99_ms": 10.0,  # long-poll p99 with 100 runners waiting
    "sqlite_cycles": 600.0,  # full cycles per second on SQLite
    "rss_mb": 150.0,  # API RSS, master + workers
}


# --------------------------------------------------------------------------------------------------
# A lean keep-alive HTTP client (requests costs ~4x the CPU per call, which matters on 2 cores)


class Http:
    """One keep-alive HTTP/1.1 connection to the API with a bearer credential."""

    def __init__(self, host: str, port: int, secret: str, runner_name: str | None = None,
                 timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = {"Authorization": f"Bearer {secret}", "Connection": "keep-alive"}
        if runner_name:
            self.headers["X-Helix-Runner"] = runner_name
        self.conn: http.client.HTTPConnection | None = None
        self.used = False

    def connect(self) -> None:
        """Open the connection now (so the first timed request does not pay for it)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.used = False

    def close(self) -> None:
        """Drop the connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: Any = None, parse: bool = True) -> tuple[int, Any]:
        """Send one request; returns (status, parsed JSON or None).

        Retries once only when a reused idle connection turns out to be closed by the server, before
        any byte of the answer: the request was then never processed.
        """
        data = json.dumps(body).encode() if body is not None else None
        headers = self.headers if data is None else {**self.headers, "Content-Type": "application/json"}
        for attempt in (0, 1):
            self.connect()
            assert self.conn is not None
            reused = self.used
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt or not reused:
                    raise
                continue
            except Exception:
                self.close()
                raise
            self.used = True
            if resp.will_close:
                self.close()
            if not parse or not raw:
                return resp.status, None
            return resp.status, json.loads(raw)
        raise AssertionError("unreachable")


def _claim_path(model: str, wait: float) -> str:
    return f"{CLAIM_PATH}?mode=create&type=text&model_name={quote(model, safe='')}&wait={wait:g}"


def _session_body(model: str, message: str = "ping") -> dict[str, Any]:
    return {"mode": "create", "type": "text", "model_name": model, "message": message}


# --------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Latency:
    """Dispatch latency samples of one configuration, in milliseconds."""

    label: str
    sent_ms: list[float] = field(default_factory=list)  # create sent -> claim received
    acked_ms: list[float] = field(default_factory=list)  # create acknowledged -> claim received
    lost: int = 0  # samples whose claim never came back in time
    errors: int = 0
    seconds: float = 0.0
    idle_cpu_pct: float | None = None  # API CPU while the runners wait and nothing is queued

    def summary(self) -> dict[str, Any]:
        """p50/p99 of both measures, and the counts."""
        out: dict[str, Any] = {"label": self.label, "samples": len(self.sent_ms), "lost": self.lost,
                               "errors": self.errors, "seconds": round(self.seconds, 1),
                               "idle_cpu_pct": self.idle_cpu_pct}
        for name, values in (("sent", self.sent_ms), ("acked", self.acked_ms)):
            if values:
                out[f"{name}_p50_ms"] = percentile(values, 50)
                out[f"{name}_p99_ms"] = percentile(values, 99)
                out[f"{name}_max_ms"] = max(values)
        return out


@dataclass
class Throughput:
    """A full-cycle throughput run."""

    tasks: int
    created: int = 0
    completed: int = 0
    seconds: float = 0.0
    create_seconds: float = 0.0  # first create sent -> last create acknowledged
    errors: int = 0
    note: str = ""
    server_cpu_ms: float | None = None  # API (or Celery worker) CPU per completed task
    client_cpu_ms: float | None = None  # this benchmark's producers and runners, per completed task
    producer_messages: list = field(default_factory=list, repr=False)

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Memory of a process tree


class TreeMemory:
    """Samples the RSS of a process and its descendants in the background; keeps the peaks."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.every = every
        self.peak_sum = 0
        self.peak_worker = 0
        self.peak_master = 0
        self.peak_pss = 0
        self.processes = 0
        self.phases: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _tree(self) -> list[Any]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return []

    def sample(self, full: bool = False) -> dict[str, float]:
        """One sample: RSS sum, largest child's RSS, and (with `full`) the PSS sum."""
        total = worker = pss = 0
        tree = self._tree()
        for proc in tree:
            try:
                if full:
                    info = proc.memory_full_info()
                    pss += getattr(info, "pss", info.rss)
                else:
                    info = proc.memory_info()
            except self._psutil.Error:
                continue
            total += info.rss
            if proc.pid != self.root.pid:
                worker = max(worker, info.rss)
            else:
                self.peak_master = max(self.peak_master, info.rss)
        self.peak_sum = max(self.peak_sum, total)
        self.peak_worker = max(self.peak_worker, worker)
        self.peak_pss = max(self.peak_pss, pss)
        self.processes = max(self.processes, len(tree))
        return {"rss_sum_mb": total / 2**20, "worker_rss_mb": worker / 2**20, "pss_sum_mb": pss / 2**20}

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the live processes of the tree."""
        total = 0.0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
            except self._psutil.Error:
                continue
            total += times.user + times.system
        return total

    def phase_end(self, label: str) -> None:
        """Record a full sample at the end of a phase."""
        self.phases[label] = {k: round(v, 1) for k, v in self.sample(full=True).items()}
        logger.info("  memory after %s: %s", label, self.phases[label])

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the peaks in MB."""
        self._stop.set()
        self._thread.join(timeout=2)
        return {"rss_sum_mb": self.peak_sum / 2**20, "worker_rss_mb": self.peak_worker / 2**20,
                "master_rss_mb": self.peak_master / 2**20,
                "pss_sum_mb": self.peak_pss / 2**20, "processes": self.processes, "phases": self.phases}


# --------------------------------------------------------------------------------------------------
# Load generators (module-level functions: they run in spawned processes)


def _runner_thread(cfg: dict[str, Any], index: int, stop: Any, out: Any, counter: Any) -> None:
    """One runner: claim (long- or short-poll), complete at once, report, repeat until stopped.

    After `stop` is set it leaves at its next 204 or right after its next completed task, which is
    how the main process drains long-polls: it queues one stop task per runner.
    """
    name = f"bench-{os.getpid()}-{index}"
    client = Http(cfg["host"], cfg["port"], cfg["token"], runner_name=name)
    short = cfg["mode"] == "short"
    period = cfg.get("period", SHORT_POLL_PERIOD)
    path = _claim_path(cfg["model"], 0 if short else cfg["wait"])
    next_poll = time.monotonic() + random.uniform(0, period)
    count = errors = 0
    last_done = 0.0
    poll_now = False
    try:
        client.connect()
    except OSError:
        errors += 1
    while True:
        if short and not poll_now:
            while True:
                now = time.monotonic()
                if stop.is_set() or now >= next_poll:
                    break
                time.sleep(min(next_poll - now, 0.2))
            if stop.is_set():
                break
            while next_poll <= now:
                next_poll += period
        poll_now = False
        try:
            status, body = client.request("GET", path)
        except (OSError, http.client.HTTPException) as exc:
            errors += 1
            logger.debug("%s: claim failed: %r", name, exc)
            if stop.is_set():
                break
            time.sleep(0.2)
            continue
        if status == 204:
            if stop.is_set():
                break
            continue
        t1 = time.monotonic()
        if status != 200:
            errors += 1
            time.sleep(0.1)
            continue
        task = body["task"]
        poison = task["input"]["messages"][-1]["content"] == STOP_MESSAGE
        try:
            done_status, _ = client.request(
                "POST", f"{CLAIM_PATH}/{task['id']}/complete",
                {"lease_token": body["lease"]["token"], "result": {"text": "ok"}}, parse=False)
        except (OSError, http.client.HTTPException):
            done_status = 0
        t2 = time.monotonic()
        if done_status != 200:
            errors += 1
        if not poison:
            if cfg["purpose"] == "latency":
                out.put(("claim", task["session_id"], t1, t2, done_status))
            else:
                count += 1
                last_done = t2
                with counter.get_lock():
                    counter.value += 1
        if stop.is_set():
            break
        poll_now = True  # a runner that just finished work asks again at once
    client.close()
    out.put(("runner_done", count, last_done, errors))


def runner_process(cfg: dict[str, Any], threads: int, stop: Any, out: Any, counter: Any) -> None:
    """A process with `threads` runner threads."""
    workers = [threading.Thread(target=_runner_thread, args=(cfg, i, stop, out, counter), daemon=True)
               for i in range(threads)]
    for w in workers:
        w.start()
    ready = _cpu()
    out.put(("ready", os.getpid()))
    for w in workers:
        w.join()
    out.put(("cpu", _cpu() - ready))  # the load's CPU, not the interpreter's start-up


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _producer_thread(cfg: dict[str, Any], count: int, go: Any, halt: Any, out: Any) -> None:
    client = Http(cfg["host"], cfg["port"], cfg["key"])
    body = _session_body(cfg["model"])
    ok = errors = 0
    client.connect()
    go.wait()
    first = time.monotonic()
    for _ in range(count):
        if halt.is_set():  # the time cap: stop creating, the runners drain what is queued
            break
        try:
            status, _ = client.request("POST", SESSIONS_PATH, body, parse=False)
        except (OSError, http.client.HTTPException):
            status = 0
        if status == 201:
            ok += 1
        else:
            errors += 1
    out.put(("producer_done", first, time.monotonic(), ok, errors))
    client.close()


def producer_process(cfg: dict[str, Any], counts: list[int], go: Any, halt: Any, out: Any) -> None:
    """A process with one producer thread per entry of `counts` (sessions each creates)."""
    workers = [threading.Thread(target=_producer_thread, args=(cfg, n, go, halt, out), daemon=True)
               for n in counts]
    for w in workers:
        w.start()
    ready = _cpu()
    out.put(("ready", os.getpid()))
    for w in workers:
        w.join()
    out.put(("cpu", _cpu() - ready))  # the load's CPU, not the interpreter's start-up


def _spread(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _runner_layout(runners: int) -> list[int]:
    """Threads per runner process: 1 -> [1], 10 -> [5, 5], 100 -> [25]*4, 8 -> [4, 4]."""
    procs = 1 if runners == 1 else min(4, max(2, runners // 25))
    return [n for n in _spread(runners, procs) if n]


# --------------------------------------------------------------------------------------------------
# The API under test


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _console_script(name: str) -> list[str]:
    beside = Path(sys.executable).with_name(name)
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "helix_api.cli"]


def _stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM a process we started (its own process group), SIGKILL the group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning("pid %s ignored SIGTERM for %.0fs; killing its process group", proc.pid, timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


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
            _stop_process(self.proc)
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


# --------------------------------------------------------------------------------------------------
# Helix phases


def _drain(queue_: Any, timeout: float = 0.0) -> list[tuple]:
    items = []
    while True:
        try:
            items.append(queue_.get(timeout=timeout) if timeout else queue_.get_nowait())
        except queue.Empty:
            return items


def _start_runners(ctx: Any, cfg: dict[str, Any], runners: int, out: Any, stop: Any,
                   counter: Any) -> list[Any]:
    procs = []
    for threads in _runner_layout(runners):
        proc = ctx.Process(target=runner_process, args=(cfg, threads, stop, out, counter), daemon=True)
        proc.start()
        procs.append(proc)
    ready = 0
    deadline = time.monotonic() + 60
    while ready < len(procs) and time.monotonic() < deadline:
        try:
            msg = out.get(timeout=1)
        except queue.Empty:
            continue
        if msg[0] == "ready":
            ready += 1
    return procs


def _stop_runners(api: HelixApi, procs: list[Any], runners: int, model: str, stop: Any, out: Any,
                  long_poll: bool) -> list[tuple]:
    """Stop runner processes; long-pollers are released by one stop task each, not left hanging."""
    stop.set()
    if long_poll:
        client = api.user_client()
        for _ in range(runners):
            client.request("POST", SESSIONS_PATH, _session_body(model, STOP_MESSAGE), parse=False)
        client.close()
    deadline = time.monotonic() + 40
    for proc in procs:
        proc.join(timeout=max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            logger.warning("runner process %s did not stop; terminating it", proc.pid)
            proc.terminate()
            proc.join(timeout=5)
    return _drain(out, timeout=0.2)


def measure_latency(ctx: Any, api: HelixApi, *, model: str, runners: int, mode: str, samples: int,
                    warmup: int, monitor: TreeMemory | None = None) -> Latency:
    """Create one task at a time while `runners` wait; time create sent -> claim received."""
    label = f"{'long' if mode == 'long' else 'short'}-poll, {runners} runner(s)"
    result = Latency(label)
    out, stop = ctx.Queue(), ctx.Event()
    counter = ctx.Value("q", 0)
    cfg = api.runner_cfg(model=model, mode=mode, wait=30, period=SHORT_POLL_PERIOD, purpose="latency")
    procs = _start_runners(ctx, cfg, runners, out, stop, counter)
    time.sleep(0.5)  # let every long-poll reach the server
    if monitor is not None:  # what waiting runners cost the API while nothing is queued
        cpu0, t0 = monitor.cpu_seconds(), time.monotonic()
        time.sleep(1.5)
        result.idle_cpu_pct = 100 * (monitor.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    client = api.user_client()
    client.connect()
    body = _session_body(model)
    started = time.monotonic()
    sample_timeout = 35.0 if mode == "long" else 5.0 + SHORT_POLL_PERIOD
    for i in range(warmup + samples):
        if mode == "long":
            time.sleep(random.uniform(0.010, 0.030))  # the last runner is back in its long-poll
        else:
            # Uniform over the gap between two polls: unbiased against the runners' fixed phases.
            time.sleep(random.uniform(0, SHORT_POLL_PERIOD / runners))
        t0 = time.monotonic()
        try:
            status, created = client.request("POST", SESSIONS_PATH, body)
        except (OSError, http.client.HTTPException) as exc:
            logger.warning("create failed: %r", exc)
            result.errors += 1
            continue
        t_ack = time.monotonic()
        if status != 201:
            result.errors += 1
            logger.warning("create answered %s: %s", status, created)
            continue
        session_id = created["id"]
        deadline = t0 + sample_timeout
        while True:
            try:
                msg = out.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                result.lost += 1
                logger.warning("%s: session %s not claimed within %.0fs", label, session_id, sample_timeout)
                break
            if msg[0] == "claim" and msg[1] == session_id:
                if msg[4] != 200:
                    result.errors += 1
                if i >= warmup:
                    result.sent_ms.append((msg[2] - t0) * 1000)
                    result.acked_ms.append((msg[2] - t_ack) * 1000)
                break
            if msg[0] == "claim":
                logger.warning("%s: a late claim of session %s arrived", label, msg[1])
    result.seconds = time.monotonic() - started
    client.close()
    for msg in _stop_runners(api, procs, runners, model, stop, out, long_poll=(mode == "long")):
        if msg[0] == "runner_done":
            result.errors += msg[3]
    return result


def measure_throughput(ctx: Any, api: HelixApi, *, model: str, tasks: int, runners: int,
                       producers: int, cap: float, monitor: TreeMemory | None = None) -> Throughput:
    """`producers` create `tasks` sessions flat out while `runners` long-poll, claim and complete.

    Creating stops after `cap` seconds if the tasks are not all created by then; the runners still
    complete every task that was created, and the rate counts those.
    """
    result = Throughput(tasks)
    out, stop, go, halt = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Event()
    counter = ctx.Value("q", 0)
    cfg = api.runner_cfg(model=model, mode="long", wait=30, purpose="count")
    runner_procs = _start_runners(ctx, cfg, runners, out, stop, counter)
    producer_procs = []
    per_thread = _spread(tasks, producers)
    split = (producers + 3) // 4  # up to 4 producer threads per process
    for chunk in (per_thread[i::split] for i in range(split)):
        proc = ctx.Process(target=producer_process, args=(cfg, chunk, go, halt, out), daemon=True)
        proc.start()
        producer_procs.append(proc)
    ready = 0
    while ready < len(producer_procs):
        msg = out.get(timeout=60)
        ready += msg[0] == "ready"
    time.sleep(1.0)  # runners are in their long-polls
    cpu0 = monitor.cpu_seconds() if monitor else 0.0
    go.set()
    started = time.monotonic()
    timeout = cap + 60.0
    last_report, last_value = started, 0
    created: int | None = None
    while counter.value < (created if created is not None else tasks) and time.monotonic() - started < timeout:
        time.sleep(0.05)
        if created is None and time.monotonic() - started >= cap:
            halt.set()
            created = _created_after_halt(out, producer_procs, result)
            logger.info("  time cap of %.0fs: %d of %d sessions were created; draining them", cap,
                        created, tasks)
        if time.monotonic() - last_report >= 5:
            value = counter.value
            logger.info("  ... %d/%d complete (%.0f/s over the last 5 s)", value, tasks,
                        (value - last_value) / (time.monotonic() - last_report))
            last_report, last_value = time.monotonic(), value
    cpu1 = monitor.cpu_seconds() if monitor else 0.0
    expected = created if created is not None else tasks
    if created is not None:
        result.note = f"capped at {cap:.0f}s: {created} of {tasks} created"
    if counter.value < expected:
        result.note += f"; timed out with {counter.value} of {expected} complete"
        logger.warning("throughput: %s", result.note)
    for proc in producer_procs:
        proc.join(timeout=30)
    messages = result.producer_messages + _drain(out, timeout=0.2)
    messages += _stop_runners(api, runner_procs, runners, model, stop, out, long_poll=True)
    firsts, last_creates, last_dones = [], [], []
    client_cpu = 0.0
    for msg in messages:
        if msg[0] == "producer_done":
            firsts.append(msg[1])
            last_creates.append(msg[2])
            result.created += msg[3]
            result.errors += msg[4]
        elif msg[0] == "runner_done":
            result.completed += msg[1]
            if msg[1]:
                last_dones.append(msg[2])
            result.errors += msg[3]
        elif msg[0] == "cpu":
            client_cpu += msg[1]
    if firsts and last_dones:
        result.seconds = max(last_dones) - min(firsts)
        result.create_seconds = max(last_creates) - min(firsts)
    if result.completed:
        if monitor:
            result.server_cpu_ms = 1000 * (cpu1 - cpu0) / result.completed
        result.client_cpu_ms = 1000 * client_cpu / result.completed
    return result


def _created_after_halt(out: Any, producer_procs: list[Any], result: Throughput) -> int:
    """Wait for every producer thread to stop and say how many sessions they created in all."""
    for proc in producer_procs:
        proc.join(timeout=60)
    created = 0
    for msg in _drain(out, timeout=0.2):
        if msg[0] == "producer_done":
            created += msg[3]
        result.producer_messages.append(msg)
    return created


def run_helix(backend: str, ctx: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every Helix phase on one database backend."""
    models = [f"bench/{kind}-{n}" for kind in ("long", "short") for n in args.runners] + ["bench/throughput"]
    api = HelixApi(backend, workdir, args, models)
    out: dict[str, Any] = {"long": {}, "short": {}}
    memory = None
    try:
        api.setup()
        # every waiting runner holds a thread; on PostgreSQL they spread (unevenly) over the workers
        api.start_with_threads(max(args.runners) + 16)
        memory = TreeMemory(api.proc.pid)
        out["server"] = api.banner + (f"; {api.threads_note}" if api.threads_note else "")
        out["command"] = api.command
        memory.phase_end("start")
        for mode in [m for m in ("long", "short") if m in args.phases]:
            for n in args.runners:
                samples = args.samples if mode == "long" else args.short_samples
                logger.info("%s: %s-poll latency, %d runner(s), %d samples", backend, mode, n, samples)
                lat = measure_latency(ctx, api, model=f"bench/{mode}-{n}", runners=n, mode=mode,
                                      samples=samples, warmup=args.warmup, monitor=memory)
                out[mode][n] = lat.summary()
                logger.info("  %s", _fmt_summary(out[mode][n]))
                memory.phase_end(f"{mode}-poll x{n}")
        if "throughput" not in args.phases:
            return out
        logger.info("%s: throughput, %d tasks, %d runners, %d producers", backend, args.tasks,
                    THROUGHPUT_RUNNERS, args.producers)
        tput = measure_throughput(ctx, api, model="bench/throughput", tasks=args.tasks,
                                  runners=THROUGHPUT_RUNNERS, producers=args.producers,
                                  cap=args.max_seconds, monitor=memory)
        tput.producer_messages = []
        out["throughput"] = {**asdict(tput), "per_second": tput.per_second}
        logger.info("  %d/%d cycles in %.2fs = %.0f/s (creates done after %.2fs), %d errors; CPU per cycle: "
                    "API %.2f ms, benchmark clients %.2f ms", tput.completed, tput.tasks, tput.seconds,
                    tput.per_second, tput.create_seconds, tput.errors, tput.server_cpu_ms or 0,
                    tput.client_cpu_ms or 0)
        memory.phase_end("throughput")
    except Exception:
        logger.error("%s run failed; API log tail:\n%s", backend, api.log_tail())
        raise
    finally:
        if memory is not None:
            out["memory"] = memory.stop()
        api.stop()
        api.teardown()
    return out


def _fmt_summary(s: dict[str, Any]) -> str:
    if "sent_p50_ms" not in s:
        return f"{s['label']}: no samples (lost {s['lost']}, errors {s['errors']})"
    return (f"{s['label']}: sent->claim p50 {s['sent_p50_ms']:.2f} ms p99 {s['sent_p99_ms']:.2f} ms "
            f"max {s['sent_max_ms']:.1f} ms; acked->claim p50 {s['acked_p50_ms']:.2f} ms; "
            f"n={s['samples']} lost={s['lost']} errors={s['errors']} in {s['seconds']}s; idle API CPU "
            f"{s['idle_cpu_pct'] if s.get('idle_cpu_pct') is not None else float('nan'):.1f}%")


# --------------------------------------------------------------------------------------------------
# Celery + Redis, the same workload


_celery_app = None


def _noop_task() -> float:
    """The no-op task: returns the moment its body started."""
    return time.time()


def get_celery_app():
    """The Celery app (built on first use, so the Helix-only runs never import Celery)."""
    global _celery_app
    if _celery_app is None:
        from celery import Celery

        url = os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)
        app = Celery("helix_bench", broker=url, backend=url)
        app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                        task_default_queue=CELERY_QUEUE, result_expires=3600,
                        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
        app.task(name="helix_bench.noop")(_noop_task)
        _celery_app = app
    return _celery_app


def __getattr__(name: str) -> Any:  # PEP 562: `celery -A bench.dispatch:celery_app worker`
    if name == "celery_app":
        return get_celery_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_celery(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Latency and throughput of a no-op Celery task through Redis."""
    import redis
    from celery import __version__ as celery_version

    os.environ[REDIS_URL_ENV] = args.redis_url
    rds = redis.Redis.from_url(args.redis_url)
    if rds.dbsize():
        raise RuntimeError(f"Redis database {args.redis_url} is not empty ({rds.dbsize()} keys): pick an "
                           "empty one with --redis-url (this benchmark flushes it afterwards)")
    app = get_celery_app()
    noop = app.tasks["helix_bench.noop"]
    log_path = workdir / "celery-worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "bench.dispatch:celery_app", "worker", "--pool", "prefork",
           "--concurrency", str(THROUGHPUT_RUNNERS), "--loglevel", "WARNING", "-Q", CELERY_QUEUE,
           "--without-gossip", "--without-mingle", "--without-heartbeat",
           "-n", f"helix-bench-{os.getpid()}@%h"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out: dict[str, Any] = {"celery": celery_version, "command": shlex.join(cmd)}
    info = rds.info("server")
    persistence = rds.config_get("appendonly").get("appendonly"), rds.config_get("save").get("save")
    out["redis"] = f"redis {info.get('redis_version')} (appendonly={persistence[0]}, save={persistence[1]!r})"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    memory = None
    try:
        noop.apply_async().get(timeout=90)  # the worker is up
        memory = TreeMemory(proc.pid)
        logger.info("celery: started %s", out["command"])
        for _ in range(max(args.warmup, 20)):  # every prefork child has run something
            noop.apply_async().get(timeout=30)
        logger.info("celery: latency, %d samples", args.samples)
        lat = Latency(f"celery prefork x{THROUGHPUT_RUNNERS}")
        started = time.monotonic()
        for i in range(args.warmup + args.samples):
            time.sleep(random.uniform(0.010, 0.030))
            t0 = time.time()
            res = noop.apply_async()
            t_ack = time.time()
            try:
                body_started = res.get(timeout=30)
            except Exception as exc:
                logger.warning("celery task lost: %r", exc)
                lat.lost += 1
                continue
            if i >= args.warmup:
                lat.sent_ms.append((body_started - t0) * 1000)
                lat.acked_ms.append((body_started - t_ack) * 1000)
        lat.seconds = time.monotonic() - started
        out["latency"] = lat.summary()
        logger.info("  %s", _fmt_summary(out["latency"]))
        memory.phase_end("latency")

        logger.info("celery: throughput, %d tasks", args.tasks)
        tput = Throughput(args.tasks)
        cpu0, own0 = memory.cpu_seconds(), os.times()
        t_first = time.time()
        results = [noop.apply_async() for _ in range(args.tasks)]
        t_sent = time.time()
        tput.created = len(results)
        keys = [f"celery-task-meta-{r.id}" for r in results]
        deadline = time.monotonic() + max(120.0, args.tasks / 20.0)
        done = 0
        while time.monotonic() < deadline:
            done = sum(rds.exists(*keys[i:i + 1000]) for i in range(0, len(keys), 1000))
            if done >= len(keys):
                break
            time.sleep(0.05)
        cpu1, own1 = memory.cpu_seconds(), os.times()
        last_done = 0.0
        for i in range(0, len(keys), 1000):
            for raw in rds.mget(keys[i:i + 1000]):
                if raw is None:
                    continue
                meta = json.loads(raw)
                if meta.get("status") != "SUCCESS":
                    tput.errors += 1
                    continue
                tput.completed += 1
                last_done = max(last_done, datetime.fromisoformat(meta["date_done"]).timestamp())
        tput.seconds = last_done - t_first if last_done else 0.0
        if tput.completed:
            tput.server_cpu_ms = 1000 * (cpu1 - cpu0) / tput.completed
            tput.client_cpu_ms = 1000 * ((own1.user + own1.system) - (own0.user + own0.system)) / tput.completed
        tput.create_seconds = t_sent - t_first
        if done < len(keys):
            tput.note = f"timed out with {done} complete"
        out["throughput"] = {**asdict(tput), "per_second": tput.per_second}
        logger.info("  %d/%d tasks in %.2fs = %.0f/s (all sent after %.2fs)", tput.completed, tput.tasks,
                    tput.seconds, tput.per_second, tput.create_seconds)
        memory.phase_end("throughput")
    except Exception:
        logger.error("celery run failed; worker log tail:\n%s", log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        if memory is not None:
            out["memory"] = memory.stop()
        _stop_process(proc)
        try:
            app.close()
        except Exception:
            pass
        rds.flushdb()
        logger.info("celery: worker stopped, %s flushed", args.redis_url)
    return out


# --------------------------------------------------------------------------------------------------
# Report


def _machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"logical_cpus": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False), "cpu": cpu,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "kernel": platform.release(), "sqlite": sqlite3.sqlite_version}


def _versions(args: argparse.Namespace) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("flask", "sqlalchemy", "gunicorn", "psycopg", "celery", "kombu", "redis"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if "postgres" in args.only:
        try:
            import psycopg

            with psycopg.connect(args.pg_admin_url, connect_timeout=5) as conn:
                out["postgresql-server"] = conn.execute("SHOW server_version").fetchone()[0]
                out["pg synchronous_commit"] = conn.execute("SHOW synchronous_commit").fetchone()[0]
                out["pg fsync"] = conn.execute("SHOW fsync").fetchone()[0]
        except Exception as exc:
            out["postgresql-server"] = f"unreachable ({exc.__class__.__name__})"
    return out


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "helix_api", "migrations"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {rev}" + (" + uncommitted changes under helix_api/ or migrations/" if dirty else "")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "-"
    return f"{ours / theirs:.2f}x"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_report(results: dict[str, Any], args: argparse.Namespace, machine: dict[str, Any],
                 versions: dict[str, str], elapsed: float) -> str:
    """The printed report: what ran where, then one table."""
    sq, pg, ce = results.get("sqlite"), results.get("postgres"), results.get("celery")
    backends = [("SQLite", sq), ("PG", pg)]
    out = []
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    out.append("Helix dispatch benchmark")
    out.append(f"command: {command}   (cwd {os.getcwd()})")
    out.append(f"machine: {machine['logical_cpus']} logical CPUs ({machine['physical_cores']} physical cores, "
               f"{machine['affinity']} usable), {machine['cpu']}, {machine['memory_gb']} GB RAM, "
               f"Linux {machine['kernel']}, Python {machine['python']}, SQLite {machine['sqlite']}; "
               f"load avg at start {machine['loadavg']}, at end {[round(x, 2) for x in os.getloadavg()]}")
    out.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out.append(f"code: {_git_revision()}")
    for name, res in (("SQLite", sq), ("PostgreSQL", pg)):
        if res:
            out.append(f"Helix {name}: {res.get('command', '?')}  [{res.get('server', '')}]")
    if ce:
        out.append(f"Celery: {ce['command']}  [{ce['redis']}]")
    out.append("")
    out.append("How the load was made (all on this machine, loopback, HTTP/1.1 keep-alive via http.client):")
    layout = {n: _runner_layout(n) for n in args.runners}
    out.append("  latency: one task at a time; the producer (main process) stamps t0 just before POST "
               "/api/v1/sessions, the runner that gets it stamps t1 when its claim response arrives, "
               "completes it, and reports t1; next task 10-30 ms later (long-poll) or U(0, 1 s/N) later "
               "(short-poll).")
    out.append("  runners as processes x threads: " + ", ".join(f"{n} -> {'+'.join(map(str, v))}"
                                                              for n, v in layout.items())
               + f"; long-poll wait=30; short-poll wait=0 every {SHORT_POLL_PERIOD:g} s at a random phase, "
               "again at once after finishing a task.")
    out.append(f"  samples: {args.samples} long-poll / {args.short_samples} short-poll per row, after "
               f"{args.warmup} discarded warm-ups; p99 is nearest-rank.")
    tput_layout = "+".join(map(str, _runner_layout(THROUGHPUT_RUNNERS)))
    out.append(f"  throughput: {args.tasks} sessions created flat out by {args.producers} producer threads "
               f"in {(args.producers + 3) // 4} process(es), while {THROUGHPUT_RUNNERS} runner threads "
               f"({tput_layout} per process) long-poll, claim and complete; cycles/s = completed / "
               "(first create sent -> last complete acknowledged); Helix producers stop creating after "
               f"{args.max_seconds:g} s and the runners drain what was created.")
    out.append(f"  Celery: prefork worker, --concurrency {THROUGHPUT_RUNNERS}, broker and result backend "
               f"{args.redis_url}, default acks (early) and prefetch (4); latency = .apply_async() called "
               "-> task body started (time.time() in the body); throughput = apply_async x N from one "
               "thread -> last result stored (its date_done).")
    out.append("  API RSS: gunicorn master + workers, sampled every 0.5 s, peak; Celery column: worker "
               "tree (main + 8 children).")
    out.append("")

    def lat(res: dict | None, mode: str, n: int, key: str) -> float | None:
        if not res:
            return None
        return res.get(mode, {}).get(n, {}).get(key)

    celery_lat = ce.get("latency", {}) if ce else {}
    rows = [["metric", "Helix SQLite", "Helix PG", "Celery+Redis", "SQLite/Celery", "PG/Celery",
             "target", "verdict"]]

    def verdict(target: float | None, pairs: list[tuple[str, float | None]], higher_better: bool) -> str:
        if target is None:
            return ""
        parts = []
        for name, value in pairs:
            if value is None:
                continue
            ok = value >= target if higher_better else value <= target
            parts.append(f"{name} {'PASS' if ok else 'MISS'}")
        return ", ".join(parts)

    for mode, title in (("long", "long-poll"), ("short", "1 s short-poll")):
        for n in args.runners:
            for q in ("p50", "p99"):
                key = f"sent_{q}_ms"
                s, p, c = lat(sq, mode, n, key), lat(pg, mode, n, key), celery_lat.get(key)
                target = None
                if mode == "long" and n == 100:
                    target = TARGETS["lp_p50_ms"] if q == "p50" else TARGETS["lp_p99_ms"]
                rows.append([f"{title} dispatch {q} ms, {n} idle runner(s)", _ms(s), _ms(p), _ms(c),
                             _ratio(s, c), _ratio(p, c), f"<= {target:g} ms" if target else "",
                             verdict(target, [("SQLite", s), ("PG", p)], higher_better=False)])
    for mode, title in (("long", "long-poll"),):
        for n in args.runners:
            key = "acked_p50_ms"
            s, p, c = lat(sq, mode, n, key), lat(pg, mode, n, key), celery_lat.get(key)
            rows.append([f"{title} create-acked->claim p50 ms, {n} runner(s)", _ms(s), _ms(p), _ms(c),
                         "", "", "", ""])

    def tput(res: dict | None) -> float | None:
        return res["throughput"]["per_second"] if res and "throughput" in res else None

    s, p, c = tput(sq), tput(pg), tput(ce)
    rows.append([f"full cycles/s (8 runners; {args.tasks} tasks, Helix capped at {args.max_seconds:g} s)",
                 _num(s), _num(p), _num(c), _ratio(s, c),
                 _ratio(p, c), f">= {TARGETS['sqlite_cycles']:g}/s (SQLite)",
                 verdict(TARGETS["sqlite_cycles"], [("SQLite", s)], higher_better=True)])

    def tput_cpu(res: dict | None, key: str) -> float | None:
        return res["throughput"].get(key) if res and "throughput" in res else None

    s, p, c = (tput_cpu(r, "server_cpu_ms") for r in (sq, pg, ce))
    rows.append(["  API CPU ms per cycle (Celery: worker; DB/Redis excluded)", _ms(s), _ms(p), _ms(c),
                 _ratio(s, c), _ratio(p, c), "", ""])
    s, p, c = (tput_cpu(r, "client_cpu_ms") for r in (sq, pg, ce))
    rows.append(["  benchmark client CPU ms per cycle", _ms(s), _ms(p), _ms(c), "", "", "", ""])
    for mode, title in (("long", "long-poll"), ("short", "short-poll")):
        def idle(res: dict | None, mode: str = mode) -> str:
            if not res or not res.get(mode):
                return "-"
            return "/".join(_num(res[mode][n].get("idle_cpu_pct")) if n in res[mode] else "-"
                            for n in args.runners)
        rows.append([f"idle API CPU %, {title}, {'/'.join(map(str, args.runners))} runners", idle(sq),
                     idle(pg), "", "", "", "", ""])

    def mem(res: dict | None, key: str) -> float | None:
        return res["memory"][key] if res and "memory" in res else None

    s, p, c = mem(sq, "rss_sum_mb"), mem(pg, "rss_sum_mb"), mem(ce, "rss_sum_mb")
    rows.append(["API RSS peak MB, master+workers", _num(s), _num(p), _num(c), _ratio(s, c), _ratio(p, c),
                 f"<= {TARGETS['rss_mb']:g} MB", verdict(TARGETS["rss_mb"], [("SQLite", s), ("PG", p)], False)])
    s, p, c = mem(sq, "worker_rss_mb"), mem(pg, "worker_rss_mb"), mem(ce, "worker_rss_mb")
    rows.append(["  largest worker RSS MB", _num(s), _num(p), _num(c), "", "", "", ""])
    s, p, c = mem(sq, "master_rss_mb"), mem(pg, "master_rss_mb"), mem(ce, "master_rss_mb")
    rows.append(["  master (arbiter) RSS MB", _num(s), _num(p), _num(c), "", "", "", ""])
    s, p, c = mem(sq, "pss_sum_mb"), mem(pg, "pss_sum_mb"), mem(ce, "pss_sum_mb")
    rows.append(["  PSS MB, master+workers (shared pages split)", _num(s), _num(p), _num(c), "", "", "", ""])
    s, p, c = mem(sq, "processes"), mem(pg, "processes"), mem(ce, "processes")
    rows.append(["  processes", _num(s), _num(p), _num(c), "", "", "", ""])
    out.append(_table(rows))
    out.append("")
    out.append("ratio = Helix / Celery: below 1.00x is better for latency and RSS, above 1.00x is better "
               "for cycles/s. 'dispatch' = create sent -> claim received by the runner (Celery: "
               "apply_async called -> task body started).")
    problems = []
    for name, res in backends + [("Celery", ce)]:
        if not res:
            continue
        for mode in ("long", "short"):
            for summ in res.get(mode, {}).values():
                if summ.get("lost") or summ.get("errors"):
                    problems.append(f"{name} {summ['label']}: lost {summ['lost']}, errors {summ['errors']}")
        if res.get("latency", {}).get("lost"):
            problems.append(f"{name} latency: lost {res['latency']['lost']}")
        t = res.get("throughput")
        if t and (t["errors"] or t["completed"] != t["created"] or "timed out" in t.get("note", "")):
            problems.append(f"{name} throughput: {t['completed']} of {t['created']} created completed, "
                            f"{t['errors']} errors {t.get('note', '')}")
    for name, res in backends + [("Celery", ce)]:
        if res and "throughput" in res:
            t = res["throughput"]
            out.append(f"{name} throughput detail: {t['completed']} completed of {t['created']} created "
                       f"({t['tasks']} asked{'; ' + t['note'] if t.get('note') else ''}) in {t['seconds']:.2f} s; "
                       f"the last create/send was done after {t['create_seconds']:.2f} s")
    out.append("problems: " + ("; ".join(problems) if problems else "none (every task claimed once and "
                                                                      "completed, no HTTP errors)"))
    out.append(f"total benchmark time: {elapsed:.0f} s")
    return "\n".join(out)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


# --------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smaller counts: 1000 tasks, 50 long-poll and 10 short-poll samples")
    p.add_argument("--only", default="sqlite,postgres,celery",
                   help="comma-separated subset of sqlite, postgres, celery")
    p.add_argument("--phases", default="long,short,throughput",
                   help="comma-separated subset of long (long-poll latency), short (short-poll latency), "
                        "throughput; Celery runs its latency with long and its throughput with throughput")
    p.add_argument("--tasks", type=int, default=None, help="throughput tasks (default 5000, 1000 with --quick)")
    p.add_argument("--runners", default="1,10,100", help="idle runner counts for the latency rows")
    p.add_argument("--samples", type=int, default=None, help="long-poll latency samples per row (200; 50)")
    p.add_argument("--short-samples", type=int, default=None,
                   help="short-poll latency samples per row (15; 10): each costs up to a second with 1 runner")
    p.add_argument("--warmup", type=int, default=None, help="discarded warm-up samples per row (10; 5)")
    p.add_argument("--producers", type=int, default=8, help="producer threads in the throughput run")
    p.add_argument("--max-seconds", type=float, default=15.0,
                   help="stop creating after this long in a Helix throughput run (the runners still "
                        "complete what was created); keeps a slow API from running for minutes")
    p.add_argument("--api-threads", type=int, default=None,
                   help="helix serve --threads (default: helix's own, raised to most runners + 16 when it "
                        "is lower, as every waiting long-poll holds a thread)")
    p.add_argument("--api-workers", type=int, default=None, help="helix serve --workers (default: helix's)")
    p.add_argument("--api-log-level", default="INFO", help="helix --log-level for the server")
    p.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL,
                   help="PostgreSQL to create the throwaway helix_bench_* database in")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis db for Celery (must be empty; flushed)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = set(args.only) - {"sqlite", "postgres", "celery"}
    if bad:
        p.error(f"--only: unknown {', '.join(sorted(bad))}")
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if set(args.phases) - {"long", "short", "throughput"}:
        p.error("--phases: long, short, throughput")
    args.runners = [int(x) for x in args.runners.split(",") if x.strip()]
    if not args.runners or min(args.runners) < 1:
        p.error("--runners: positive integers")
    args.tasks = args.tasks or (1000 if args.quick else 5000)
    args.samples = args.samples or (50 if args.quick else 200)
    args.short_samples = args.short_samples or (10 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.quick else 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    machine = _machine()
    versions = _versions(args)
    ctx = mp.get_context("spawn")
    results: dict[str, Any] = {}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="helix-bench-"))
    ok = True
    try:
        for backend in ("sqlite", "postgres"):
            if backend in args.only:
                try:
                    results[backend] = run_helix(backend, ctx, workdir, args)
                except Exception:
                    logger.exception("Helix on %s failed", backend)
                    ok = False
        if "celery" in args.only:
            try:
                results["celery"] = run_celery(workdir, args)
            except Exception:
                logger.exception("Celery run failed")
                ok = False
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            logger.error("logs kept in %s", workdir)
    report = build_report(results, args, machine, versions, time.monotonic() - started)
    print(report, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                         "machine": machine, "versions": versions, "results": results},
                                        indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
