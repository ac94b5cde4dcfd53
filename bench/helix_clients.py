"""Clients of the Helix API: a lean keep-alive HTTP connection, and the runner and producer processes.

The process entry points are module-level functions: they run in spawned processes. `http.client`
is used rather than requests, which costs about 4x the CPU per call (that matters on 2 cores).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
from typing import Any
from urllib.parse import quote

from bench.measures import SHORT_POLL_PERIOD

logger = logging.getLogger(__name__)

STOP_MESSAGE = "__bench_stop__"
CLAIM_PATH = "/api/v1/worker/task"
SESSIONS_PATH = "/api/v1/sessions"


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


def claim_path(model: str, wait: float) -> str:
    """The runner claim URL path for `model`, long-polling `wait` seconds."""
    return f"{CLAIM_PATH}?mode=create&type=text&model_name={quote(model, safe='')}&wait={wait:g}"


def session_body(model: str, message: str = "ping") -> dict[str, Any]:
    """The JSON body that creates a one-message text session on `model`."""
    return {"mode": "create", "type": "text", "model_name": model, "message": message}


def _runner_thread(cfg: dict[str, Any], index: int, stop: Any, out: Any, counter: Any) -> None:
    """One runner: claim (long- or short-poll), complete at once, report, repeat until stopped.

    After `stop` is set it leaves at its next 204 or right after its next completed task, which is
    how the main process drains long-polls: it queues one stop task per runner.
    """
    name = f"bench-{os.getpid()}-{index}"
    client = Http(cfg["host"], cfg["port"], cfg["token"], runner_name=name)
    short = cfg["mode"] == "short"
    period = cfg.get("period", SHORT_POLL_PERIOD)
    path = claim_path(cfg["model"], 0 if short else cfg["wait"])
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
        # As helix-runner does, a completion in the throughput run also claims the next task, so
        # a busy runner sends one request per task; the latency runs time the claim itself.
        chain = cfg["purpose"] != "latency"
        while body is not None:
            task = body["task"]
            poison = task["input"]["messages"][-1]["content"] == STOP_MESSAGE
            done: dict[str, Any] = {"lease_token": body["lease"]["token"], "result": {"text": "ok"}}
            if chain and not poison and not stop.is_set():
                done["claim_next"] = True
            try:
                done_status, reply = client.request("POST", f"{CLAIM_PATH}/{task['id']}/complete", done)
            except (OSError, http.client.HTTPException):
                done_status, reply = 0, None
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
            body = (reply or {}).get("next")
        if stop.is_set():
            break
        poll_now = True  # a runner that just finished work asks again at once
    client.close()
    out.put(("runner_done", count, last_done, errors))


def runner_process(cfg: dict[str, Any], threads: int, stop: Any, out: Any, counter: Any) -> None:
    """A process with `threads` runner threads."""
    _run_threads([(cfg, i, stop, out, counter) for i in range(threads)], _runner_thread, out)


def _run_threads(args: list[tuple], target: Any, out: Any) -> None:
    """Run `target` on a thread per args tuple; report readiness, then the CPU the load used."""
    workers = [threading.Thread(target=target, args=a, daemon=True) for a in args]
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
    body = session_body(cfg["model"])
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
    _run_threads([(cfg, n, go, halt, out) for n in counts], _producer_thread, out)


def spread(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` near-equal counts."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def runner_layout(runners: int) -> list[int]:
    """Threads per runner process: 1 -> [1], 10 -> [5, 5], 100 -> [25]*4, 8 -> [4, 4]."""
    procs = 1 if runners == 1 else min(4, max(2, runners // 25))
    return [n for n in spread(runners, procs) if n]
