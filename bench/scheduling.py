"""Scheduling benchmark (issue 23): each of the fleet's scheduling rules, on and off, against a simulated fleet.

    .venv/bin/python -m bench.scheduling             # full run (about 8 minutes on 2 cores)
    .venv/bin/python -m bench.scheduling --quick     # smaller counts (about 2 minutes)
    .venv/bin/python -m bench.scheduling --database-url postgresql://postgres@127.0.0.1:5432/test

32 simulated runner processes (bench.sim_fleet: the real worker protocol, a test-double backend whose
adapter load costs `--load-ms` and is counted) serve a real `helix serve`; every scenario starts a
fresh server on a fresh database with the settings of its rule on or off. Work comes through the real
session API: sessions created (`POST /api/v1/sessions`) and continued (`.../messages`, continue
priority), fine-tunes uploaded as multipart and trained by a runner that uploads an adapter file.
A chat gets an adapter the only way the API gives one: by continuing a fine-tuned session
(records.add_message reads the session's adapter), so the warm scenario first trains 8 adapters,
each in several sessions (sessions trained on the same bytes share the adapter's key, its sha256).
Waits (queued -> claimed) are read from the tasks table afterwards. The reservation row is written
with SQL, as no operator endpoint for it is relied on.

Figures, rule on against off: adapter loads per 100 tasks (warm routing: WARM_WAIT_SECONDS 1 and
runners sending warm=, against 0 and no warm=); a small user's p50/p99 wait while a big user has a
backlog queued (FAIR_SHARE 1 against 0), beside its p50 with no big user; a fine-tune's wait behind
continue chats (a reservation of 1 against none); a new session's wait under continue traffic
(AGEING_SECONDS 2 against 0); the start estimate's error (when the session JSON carries one); full
cycles/s of bench.dispatch's throughput run with every rule at its default against all off; and the
runners wanted (when the API publishes helix_runners_wanted) against a perfect scaler under a step load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing as mp
import queue
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.helix_clients import SESSIONS_PATH, Http, session_body  # noqa: E402
from bench.helix_load import measure_throughput  # noqa: E402
from bench.helix_server import HelixApi  # noqa: E402
from bench.measures import THROUGHPUT_RUNNERS, percentile  # noqa: E402
from bench.processes import TreeMemory  # noqa: E402
from bench.sim_fleet import Done, Fleet, Plan, multipart, post_raw, upload_adapter  # noqa: E402

logger = logging.getLogger("bench.scheduling")

FLEET = 32
ADAPTERS = 8
POLL_WAIT_S = 1.0  # the simulated runners' long-poll: "one poll interval"
TARGET_LOAD_RATIO = 5.0
TARGET_SMALL_P50_RATIO = 2.0
TARGET_ESTIMATE_PCT = 25.0
TARGET_RULES_COST_PCT = 10.0
# The runners a per-user running limit leaves to others in the `capped` fair-share scenario: the small
# user's own load (20 tasks/s of 50 ms) needs one on average, and sometimes two at once.
CAPPED_HEADROOM = 2
ALL_OFF = {"WARM_WAIT_SECONDS": "0", "FAIR_SHARE": "0", "AGEING_SECONDS": "0"}
# Sizes per mode: tasks measured, the big user's backlog, scenario lengths in seconds.
SIZES = {"full": {"warm_tasks": 300, "warm_sessions": 4, "big": 1000, "fine_tunes": 3, "ft_cap": 10.0,
                  "ageing_s": 12.0, "estimate_s": 8.0, "dispatch_tasks": 3000, "dispatch_rounds": 2, "step_s": 10.0},
         "quick": {"warm_tasks": 100, "warm_sessions": 2, "big": 300, "fine_tunes": 2, "ft_cap": 5.0,
                   "ageing_s": 6.0, "estimate_s": 4.0, "dispatch_tasks": 1000, "dispatch_rounds": 1, "step_s": 5.0},
         # The smoke test's: every scenario runs, no figure means much.
         "tiny": {"warm_tasks": 16, "warm_sessions": 1, "big": 40, "fine_tunes": 1, "ft_cap": 3.0,
                  "ageing_s": 2.0, "estimate_s": 2.0, "dispatch_tasks": 100, "dispatch_rounds": 1, "step_s": 2.0}}


def chats(n: int) -> bytes:
    """`n` training examples as JSONL (the smallest set a fine-tune accepts is a few lines)."""
    lines = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
             for i in range(n)]
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


class Server:
    """A fresh `helix serve` on a fresh database for one scenario, with its settings, users and tables."""

    def __init__(self, bench: Bench, name: str, settings: dict[str, str], model: str) -> None:
        self.model = model
        backend = "postgres" if bench.args.database_url else "sqlite"
        ns = argparse.Namespace(pg_admin_url=bench.args.database_url, api_log_level="WARNING", api_workers=None,
                                api_threads=None)
        self.api = HelixApi(backend, bench.workdir / name, ns, [model])
        # No queued-task limit: the big user's backlog is larger than the default 1,000 allows.
        # /metrics for the bench's scrapes of helix_runners_wanted, under a bearer token of its own.
        self.metrics_token = secrets.token_urlsafe(16)
        self.api.env.update({f"HELIX_{k}": v for k, v in {"MAX_QUEUED_PER_USER": "0",
                                                         "METRICS_TOKEN": self.metrics_token, **settings}.items()})
        self.users: dict[str, tuple[str, int]] = {}
        self.engine: Any = None

    def start(self) -> Server:
        from sqlalchemy import create_engine

        self.api.setup()
        self.api.start_with_threads(FLEET + 24)
        url = self.api.env.get("HELIX_DATABASE_URL") or f"sqlite:///{self.api.workdir}/data/helix.db"
        self.engine = create_engine(url)
        return self

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        self.api.stop()
        self.api.teardown()

    def user(self, label: str) -> Http:
        """A client of user `label` (created on first use)."""
        if label not in self.users:
            from sqlalchemy import text

            name = f"{label}-{secrets.token_hex(3)}"
            key = self.api._cli("users", "create", name)
            with self.engine.connect() as conn:
                user_id = conn.execute(text("SELECT id FROM users WHERE name = :n"), {"n": name}).scalar_one()
            self.users[label] = (key, user_id)
        return Http(self.api.host, self.api.port, self.users[label][0])

    def plan(self, index: int, **overrides: Any) -> Plan:
        """Runner `index`'s plan: one slot serving this server's model (`kinds` to change it)."""
        values = {"kinds": (f"create:text:{self.model}",), "wait_s": POLL_WAIT_S, **overrides}
        return Plan(self.api.host, self.api.port, self.api.token, f"sim-{index}", **values)

    def tasks(self) -> list[Any]:
        """Every task row: its user, mode, priority, session and queued/claimed times."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return list(conn.execute(text("SELECT id, user_id, mode, priority, session_id, queued_at, claimed_at "
                                          "FROM tasks ORDER BY id")))

    def waits(self, label: str, mode: str | None = None, priority: int | None = None) -> list[float | None]:
        """Seconds queued -> claimed of user `label`'s tasks (None: never claimed)."""
        user_id = self.users[label][1]
        out: list[float | None] = []
        for row in self.tasks():
            if row.user_id != user_id or (mode and str(row.mode).lower().split(".")[-1] != mode):
                continue
            if priority is not None and row.priority != priority:
                continue
            out.append(None if row.claimed_at is None else (_dt(row.claimed_at) - _dt(row.queued_at)).total_seconds())
        return out


def _dt(value: Any) -> datetime:
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value.replace(tzinfo=None)


def create(client: Http, model: str, message: str = "ping") -> dict[str, Any]:
    status, body = client.request("POST", SESSIONS_PATH, session_body(model, message))
    if status != 201:
        raise RuntimeError(f"create session: {status} {body}")
    return body


class ChatLoop:
    """Closed-loop chats: each session (or, with `new`, each slot) sends its next message when its reply
    is done, after `think_s`; the fleet's completions drive it."""

    def __init__(self, client: Http, model: str, sessions: list[int], *, new: bool = False,
                 think_s: float = 0.0, threads: int = 4) -> None:
        self.client, self.model, self.new, self.think_s = client, model, new, think_s
        self.mine = set(sessions)
        self.due: queue.Queue[int] = queue.Queue()
        self.running = True
        self.replies: list[dict[str, Any]] = []  # what each create answered (for the estimate)
        self.errors = 0
        # Several senders, each on its own connection: one alone (a request at a time) would be slower
        # than the runners, and the queue the rules reorder would never form.
        self.threads = [threading.Thread(target=self._loop, name=f"chat-loop-{i}", daemon=True) for i in range(threads)]

    def start(self, first: bool = True) -> ChatLoop:
        """Send every session's first message (`first`), then keep going."""
        if first:
            for session_id in list(self.mine):
                self.due.put(session_id)
        for thread in self.threads:
            thread.start()
        return self

    def done(self, record: Done) -> None:
        if record.session_id in self.mine and record.mode == "create":
            self.due.put(record.session_id)

    def _loop(self) -> None:
        client = Http(self.client.host, self.client.port, self.client.headers["Authorization"].split()[-1])
        while self.running:
            try:
                session_id = self.due.get(timeout=0.2)
            except queue.Empty:
                continue
            if self.think_s:
                time.sleep(self.think_s)
            if not self.running:
                return
            try:
                if self.new:
                    self.mine.discard(session_id)
                    body = create(client, self.model)
                    self.mine.add(body["id"])
                    # The estimate, as a client reads it: the session right after the create.
                    status, shown = client.request("GET", f"{SESSIONS_PATH}/{body['id']}")
                    self.replies.append({"sent": time.monotonic(), **(shown if status == 200 else body)})
                else:
                    status, _ = client.request("POST", f"{SESSIONS_PATH}/{session_id}/messages",
                                                    {"message": "more"}, parse=False)
                    self.errors += status != 201
            except Exception:
                logger.exception("chat loop: session %s", session_id)
                self.errors += 1

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=5)


def wait_for(predicate: Any, timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def stats(values: list[float | None], cap: float | None = None) -> dict[str, Any]:
    """p50/p99/max of waits in seconds; a wait never ended counts as `cap` (then the figure is a floor)."""
    ended = [v for v in values if v is not None]
    open_ = len(values) - len(ended)
    filled = ended + [cap or 0.0] * open_
    if not filled:
        return {"n": 0}
    return {"n": len(values), "never_started": open_, "p50": percentile(filled, 50), "p99": percentile(filled, 99),
            "max": max(filled)}


class Bench:
    """The fleet, the work directory and the options every scenario shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
        self.workdir = Path(tempfile.mkdtemp(prefix="helix-sched-"))
        self.fleet = Fleet(FLEET)
        self.service_s, self.load_s = args.service_ms / 1000, args.load_ms / 1000
        self.probes: dict[str, bool] = {}  # what the API under test publishes, learnt in the first scenario

    @contextlib.contextmanager
    def server(self, name: str, settings: dict[str, str], model: str = "bench/sched") -> Iterator[Server]:
        logger.info("--- %s %s", name, settings)
        server = Server(self, name, settings, model).start()
        try:
            yield server
        except Exception:
            logger.error("%s failed; API log tail:\n%s", name, server.api.log_tail())
            raise
        finally:
            with contextlib.suppress(Exception):
                self.fleet.halt()
            server.stop()

    def close(self) -> None:
        self.fleet.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- the scenarios ------------------------------------------------------------------------------

    def warm(self, on: bool) -> dict[str, Any]:
        """Adapter loads per 100 tasks: 8 adapters over 8 runners of one adapter slot each."""
        settings = {"WARM_WAIT_SECONDS": "1" if on else "0"}
        with self.server(f"warm-{'on' if on else 'off'}", settings) as srv:
            user = srv.user("warm")
            sessions = self._fine_tuned(srv, user, ADAPTERS * self.size["warm_sessions"])
            plans = [srv.plan(i, service_s=self.service_s, load_s=self.load_s, send_warm=on) for i in range(ADAPTERS)]
            loop = ChatLoop(user, srv.model, sessions)
            self.fleet.assign(plans, on_done=loop.done)
            loop.start()
            warmup, measured = 2 * ADAPTERS, self.size["warm_tasks"]
            if not wait_for(lambda: len(self.fleet.finished()) >= warmup + measured, 240):
                raise RuntimeError("warm: the fleet stalled")
            loop.stop()
            every = [d for d in self.fleet.finished() if d.mode == "create"]
            done = every[warmup:warmup + measured]
            loads = sum(d.loaded for d in done)
        return {"tasks": len(done), "loads": loads, "per_100": 100 * loads / len(done), "warmup": warmup,
                "warmup_loads": sum(d.loaded for d in every[:warmup])}

    def _fine_tuned(self, srv: Server, user: Http, count: int) -> list[int]:
        """`count` fine-tuned sessions, session i trained on adapter i % 8's bytes (so its key)."""
        body, content_type = multipart({"mode": "finetune", "type": "text", "model_name": srv.model},
                                       "data.jsonl", chats(10), field_name="files")
        sessions = []
        for _ in range(count):
            status, reply = post_raw(user, SESSIONS_PATH, body, content_type)
            if status != 201:
                raise RuntimeError(f"fine-tune: {status} {reply}")
            sessions.append(reply["id"])
        trainer = Http(srv.api.host, srv.api.port, srv.api.token, runner_name="bench-trainer")
        path = f"/api/v1/worker/task?kind=finetune:text:{srv.model}&max={count}"
        status, reply = trainer.request("GET", path)
        if status != 200 or len(reply["tasks"]) != count:
            raise RuntimeError(f"trainer claimed {status} {reply and len(reply.get('tasks', []))}")
        for claimed in reply["tasks"]:
            task, token = claimed["task"], claimed["lease"]["token"]
            adapter = f"bench-adapter-{sessions.index(task['session_id']) % ADAPTERS}".encode()
            result = upload_adapter(trainer, task["id"], token, adapter)
            status, answer = trainer.request("POST", f"/api/v1/worker/task/{task['id']}/complete",
                                             {"lease_token": token, "result": result})
            if status != 200:
                raise RuntimeError(f"trainer complete: {status} {answer}")
        trainer.close()
        return sessions

    def fair(self, mode: str) -> dict[str, Any]:
        """A small user's waits: alone, or beside a big user's backlog with FAIR_SHARE on or off, or on with a
        running limit two runners short of the fleet (`capped`: the headroom others' work finds free)."""
        runners, rate = 8, 20.0
        settings = {"FAIR_SHARE": "0" if mode == "fifo" else "1"}
        if mode == "capped":
            settings["MAX_RUNNING_PER_USER"] = str(runners - CAPPED_HEADROOM)
        duration = 0.6 * self.size["big"] * self.service_s / runners
        with self.server(f"fair-{mode}", settings) as srv:
            small = srv.user("small")
            if mode != "alone":
                self._backlog(srv, srv.user("big"), self.size["big"])
            else:  # whether this API publishes an estimate and a runners-wanted figure: else no server for them
                probe = create(small, srv.model, "probe")
                status, shown = small.request("GET", f"{SESSIONS_PATH}/{probe['id']}")
                last = (shown.get("interactions") or [{}])[-1] if status == 200 else {}
                self.probes = {"estimate": "estimated_wait_seconds" in last}
            self.fleet.assign([srv.plan(i, service_s=self.service_s) for i in range(runners)])
            time.sleep(0.5 if mode == "alone" else 0.0)  # alone: the runners are waiting when work comes
            started = time.monotonic()
            for n in range(int(duration * rate)):
                time.sleep(max(0.0, started + n / rate - time.monotonic()))
                create(small, srv.model)
            wait_for(lambda: all(w is not None for w in srv.waits("small")), 120, every=0.25)
            return {"small": stats(srv.waits("small")), "big_queued": self.size["big"] if mode != "alone" else 0}

    def _backlog(self, srv: Server, client: Http, count: int) -> None:
        """`count` new sessions from one user, queued from 4 threads."""
        def make(n: int) -> None:
            mine = Http(srv.api.host, srv.api.port, client.headers["Authorization"].split()[-1])
            for _ in range(n):
                create(mine, srv.model, "backlog")
            mine.close()
        threads = [threading.Thread(target=make, args=(count // 4 + (i < count % 4),)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def reservation(self, on: bool) -> dict[str, Any]:
        """A fine-tune's wait while continue chats keep a pool of 4 runners busy; reservation of 1 or none."""
        model = "bench/sched-ft"
        with self.server(f"reservation-{'on' if on else 'off'}", {"AGEING_SECONDS": "0"}, model) as srv:
            if on:
                from sqlalchemy import text

                with srv.engine.begin() as conn:
                    conn.execute(text("INSERT INTO reservations (model_name, runners, updated_at) "
                                      "VALUES (:m, 1, CURRENT_TIMESTAMP)"), {"m": model})
            chat, trainer = srv.user("chat"), srv.user("trainer")
            sessions = [create(chat, model)["id"] for _ in range(8)]
            kinds = (f"create:text:{model}", f"finetune:text:{model}")
            loop = ChatLoop(chat, model, sessions)
            self.fleet.assign([srv.plan(i, kinds=kinds, service_s=4 * self.service_s, finetune_s=0.5)
                               for i in range(4)], on_done=loop.done)
            loop.start(first=False)
            time.sleep(3.0)  # the chat load settles
            body, content_type = multipart({"mode": "finetune", "type": "text", "model_name": model},
                                           "data.jsonl", chats(10), field_name="files")
            cap = self.size["ft_cap"]
            for _ in range(self.size["fine_tunes"]):
                status, reply = post_raw(trainer, SESSIONS_PATH, body, content_type)
                if status != 201:
                    raise RuntimeError(f"fine-tune: {status} {reply}")
                if not wait_for(lambda: None not in srv.waits("trainer"), cap, every=0.05):
                    break  # starved: the next would only queue behind it
                time.sleep(1.5)  # it trains; the pool goes back to its chats
            loop.stop()
            return {"fine_tune": stats(srv.waits("trainer"), cap), "cap_s": cap}

    def ageing(self, on: bool) -> dict[str, Any]:
        """New sessions' waits while continue chats keep 8 runners saturated; AGEING_SECONDS 2 or 0."""
        settings = {"AGEING_SECONDS": "2" if on else "0"}
        with self.server(f"ageing-{'on' if on else 'off'}", settings) as srv:
            chat, newcomer = srv.user("chat"), srv.user("new")
            sessions = [create(chat, srv.model)["id"] for _ in range(24)]
            loop = ChatLoop(chat, srv.model, sessions)
            # Chats of 4x the service time: the senders keep ahead of 8 runners, so continue work is always queued.
            self.fleet.assign([srv.plan(i, service_s=4 * self.service_s) for i in range(8)], on_done=loop.done)
            loop.start(first=False)
            time.sleep(1.0)
            started, every = time.monotonic(), 0.5
            for n in range(int(self.size["ageing_s"] / every)):
                time.sleep(max(0.0, started + n * every - time.monotonic()))
                create(newcomer, srv.model)
            loop.stop()  # the continue traffic ends: what starved starts now, and its wait says how long
            wait_for(lambda: None not in srv.waits("new"), 60, every=0.25)
            return {"new": stats(srv.waits("new")), "traffic_s": self.size["ageing_s"]}

    def estimate(self) -> dict[str, Any]:
        """The queued reply's start estimate against its actual wait, under a steady closed-loop load."""
        if not self.probes.get("estimate", True):
            return {"present": False}
        with self.server("estimate", {}) as srv:
            user = srv.user("steady")
            # Whether this API estimates at all: asked before any runner polls, so the probe is still queued.
            probe = create(user, srv.model)
            status, shown = user.request("GET", f"{SESSIONS_PATH}/{probe['id']}")
            if status != 200 or "estimated_wait_seconds" not in (shown.get("interactions") or [{}])[-1]:
                return {"present": False}
            # Ten times the chat service time: a wait of a few service times is then long against the HTTP
            # round trips around a claim, and an error in % says something about the estimate, not the noise.
            self.fleet.assign([srv.plan(i, service_s=10 * self.service_s) for i in range(8)])
            sessions = [create(user, srv.model)["id"] for _ in range(23)]
            loop = ChatLoop(user, srv.model, sessions, new=True)
            self.fleet.on_done = loop.done
            loop.start(first=False)
            time.sleep(self.size["estimate_s"])
            loop.stop()
            rows = {row.session_id: row for row in srv.tasks() if row.claimed_at is not None}
            errors, pcts = [], []
            for reply in loop.replies[len(loop.replies) // 5:]:  # the first fifth: the load still settling
                start_at, row = _start_at(reply), rows.get(reply["id"])
                if start_at is None or row is None:
                    continue  # read after it had started (no estimate then), or never started
                queued = _dt(row.queued_at)
                guess, real = (start_at - queued).total_seconds(), (_dt(row.claimed_at) - queued).total_seconds()
                errors.append(abs(guess - real))
                pcts.append(100 * abs(guess - real) / max(real, 1e-3))
            if not errors:
                return {"present": True, "n": 0}
            return {"present": True, "n": len(errors), "median_abs_s": statistics.median(errors),
                    "median_pct": statistics.median(pcts)}

    def dispatch(self) -> dict[str, Any]:
        """bench.dispatch's full-cycle throughput run with every rule at its default, and with all off."""
        best: dict[str, float] = {}
        ctx = mp.get_context("spawn")
        for _ in range(self.size["dispatch_rounds"]):
            for label, settings in (("off", ALL_OFF), ("on", {})):
                with self.server(f"dispatch-{label}", settings, "bench/throughput") as srv:
                    memory = TreeMemory(srv.api.proc.pid)
                    tput = measure_throughput(ctx, srv.api, model="bench/throughput",
                                              tasks=self.size["dispatch_tasks"], runners=THROUGHPUT_RUNNERS,
                                              producers=8, cap=15.0, monitor=memory)
                    memory.stop()
                logger.info("  dispatch rules %s: %.0f cycles/s", label, tput.per_second)
                best[label] = max(best.get(label, 0.0), tput.per_second)  # best of rounds: noise only slows
        return {"off": best["off"], "on": best["on"], "ratio": best["on"] / best["off"]}

    def scaling(self) -> dict[str, Any]:
        """Runners wanted (helix_runners_wanted) against a perfect scaler under a step load, when published."""
        if not self.probes.get("wanted", True):
            return {"present": False}
        with self.server("scaling", {}, "bench/sched-scale") as srv:
            user = srv.user("load")
            service = 2 * self.service_s
            self.fleet.assign([srv.plan(i, service_s=service) for i in range(FLEET)])
            create(user, srv.model)
            # The figure is published for the kinds that live runners serve or that have work.
            if not wait_for(lambda: _wanted(srv) is not None, 10, every=0.5):
                return {"present": False}
            steps, samples = [5.0, 40.0, 5.0], []
            started = time.monotonic()
            for index, rate in enumerate(steps):
                step_start, n = time.monotonic(), 0
                while time.monotonic() - step_start < self.size["step_s"]:
                    create(user, srv.model)
                    n += 1
                    samples.append((time.monotonic() - started, index, _wanted(srv)))
                    time.sleep(max(0.0, step_start + n / rate - time.monotonic()))
            perfect = [max(1, math.ceil(rate * service)) for rate in steps]
            return {"present": True, **_scaling_figures(samples, perfect)}


def _start_at(reply: dict[str, Any]) -> datetime | None:
    """The estimated start a session's JSON gives its queued reply, if it gives one."""
    last = (reply.get("interactions") or [{}])[-1]
    return _dt(last["estimated_start_at"]) if last.get("estimated_start_at") else None


_WANTED = re.compile(r'^helix_runners_wanted\{[^}]*model="([^"]*)"[^}]*\}\s+([0-9.eE+-]+)', re.M)


def _wanted(srv: Server) -> float | None:
    """The runners the API wants for the server's model: /metrics, else GET /api/v1/admin/capacity."""
    text = _get_text(srv, "/metrics")
    found = [float(v) for model, v in _WANTED.findall(text or "") if model == srv.model]
    if found:
        return sum(found)
    client = Http(srv.api.host, srv.api.port, srv.api.key)
    try:
        status, body = client.request("GET", "/api/v1/admin/capacity")
        if status == 200 and isinstance(body, dict):
            for row in body.get("kinds") or body.get("capacity") or []:
                if row.get("model") == srv.model or row.get("model_name") == srv.model:
                    return float(row.get("runners_wanted", row.get("wanted")))
    except (OSError, ValueError, TypeError):
        return None
    finally:
        client.close()
    return None


def _get_text(srv: Server, path: str) -> str | None:
    import urllib.request

    request = urllib.request.Request(f"http://{srv.api.host}:{srv.api.port}{path}",
                                     headers={"Authorization": f"Bearer {srv.metrics_token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def _scaling_figures(samples: list[tuple[float, int, float | None]], perfect: list[int]) -> dict[str, Any]:
    """Lag (s from a step's start until the figure first reaches the perfect count) and overshoot % per step:
    how far above the perfect count it goes once it has reached it (the way there is the lag's)."""
    lags, overshoots = [], []
    for index, want in enumerate(perfect):
        rows = [(t, w) for t, i, w in samples if i == index and w is not None]
        if not rows:
            continue
        t0 = rows[0][0]
        up = index == 0 or want >= perfect[index - 1]
        reached = next((t for t, w in rows if (w >= want if up else w <= want)), None)
        lags.append(None if reached is None else reached - t0)
        settled = [w for t, w in rows if reached is not None and t >= reached]
        if settled:
            overshoots.append(100 * max(0, max(settled) - want) / want)
    known = [lag for lag in lags if lag is not None]
    return {"perfect": perfect, "lag_s": max(known) if known else None, "never_reached": len(lags) - len(known),
            "overshoot_pct": max(overshoots) if overshoots else None}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every scenario, rule on and off; each that fails leaves its error and the others still run."""
    bench = Bench(args)
    scenarios = {
        "warm": lambda: {"off": bench.warm(False), "on": bench.warm(True)},
        "fair": lambda: {mode: bench.fair(mode) for mode in ("alone", "fifo", "fair", "capped")},
        "reservation": lambda: {"off": bench.reservation(False), "on": bench.reservation(True)},
        "ageing": lambda: {"off": bench.ageing(False), "on": bench.ageing(True)},
        "estimate": bench.estimate,
        "dispatch": bench.dispatch,
        "scaling": bench.scaling,
    }
    result: dict[str, Any] = {"quick": args.quick, "fleet": FLEET, "service_ms": args.service_ms,
                              "load_ms": args.load_ms, "database": "postgres" if args.database_url else "sqlite",
                              "errors": {}}
    try:
        for name, run in scenarios.items():
            if args.only and name not in args.only:
                continue
            started = time.monotonic()
            try:
                result[name] = run()
            except Exception as exc:
                logger.exception("scenario %s failed", name)
                result["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            logger.info("=== %s took %.0f s: %s", name, time.monotonic() - started, result.get(name))
    finally:
        bench.close()
    result["figures"] = figures(result)
    return result


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """The flat figures bench.all and bench.targets read (keys without the `scheduling.` prefix)."""
    out: dict[str, Any] = {}
    warm = result.get("warm") or {}
    if warm:
        out["cold_loads_per_100"], out["warm_loads_per_100"] = warm["off"]["per_100"], warm["on"]["per_100"]
        out["load_ratio"] = _load_ratio(warm)[0]
    fair = result.get("fair") or {}
    if fair:
        for mode in ("alone", "fifo", "fair", "capped"):
            out[f"small_{mode}_p50_ms"] = 1000 * fair[mode]["small"]["p50"]
            out[f"small_{mode}_p99_ms"] = 1000 * fair[mode]["small"]["p99"]
    reservation = result.get("reservation") or {}
    if reservation:
        out["finetune_off_wait_s"] = reservation["off"]["fine_tune"]["p50"]
        out["finetune_wait_s"] = reservation["on"]["fine_tune"]["p50"]
    ageing = result.get("ageing") or {}
    if ageing:
        out["new_off_p50_s"], out["new_on_p50_s"] = ageing["off"]["new"]["p50"], ageing["on"]["new"]["p50"]
    estimate = result.get("estimate") or {}
    if estimate.get("n"):
        out["estimate_error_s"], out["estimate_error_pct"] = estimate["median_abs_s"], estimate["median_pct"]
    dispatch = result.get("dispatch") or {}
    if dispatch:
        out["cycles_off_per_s"], out["cycles_on_per_s"] = dispatch["off"], dispatch["on"]
    scaling = result.get("scaling") or {}
    if scaling.get("present"):
        out["scaling_lag_s"], out["scaling_overshoot_pct"] = scaling["lag_s"], scaling["overshoot_pct"]
    return {k: v for k, v in out.items() if v is not None}


def _load_ratio(warm: dict[str, Any]) -> tuple[float, bool]:
    """First-come's loads over warm routing's, and whether that is a floor (warm routing loaded nothing:
    counted as one load, the least a measurement of that many tasks can tell)."""
    on = warm["on"]["per_100"]
    floor = on == 0
    return warm["off"]["per_100"] / (100 / warm["on"]["tasks"] if floor else on), floor


def _s(value: float | None, unit: str = "s", floor: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{1000 * value:.1f} ms" if unit == "ms" or value < 1 else f"{value:.2f} s"
    return (">= " + text) if floor else text


def report(result: dict[str, Any], args: argparse.Namespace | None = None) -> str:
    """Each figure with its rule off and on, beside its target."""
    rows: list[tuple[str, str, str, str, str]] = []
    errors = result.get("errors", {})

    def missing(name: str, label: str) -> None:
        rows.append((label, "", "", "", f"not run: {errors.get(name, 'left out (--only)')}"))

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    warm = result.get("warm")
    if warm:
        ratio, floor = _load_ratio(warm)
        rows.append((f"adapter loads per 100 tasks, {ADAPTERS} adapters / {ADAPTERS} runners "
                     f"({warm['on']['tasks']} tasks after {warm['on']['warmup']})", f"{warm['off']['per_100']:.1f}",
                     f"{warm['on']['per_100']:.1f}", f">= {TARGET_LOAD_RATIO:g}x fewer",
                     f"{verdict(ratio >= TARGET_LOAD_RATIO)} ({'>= ' if floor else ''}{ratio:.1f}x fewer)"))
        rows.append((f"adapter loads in the first {warm['on']['warmup']} tasks (cold start)",
                     str(warm["off"]["warmup_loads"]), str(warm["on"]["warmup_loads"]), "", ""))
    else:
        missing("warm", "adapter loads per 100 tasks")
    fair = result.get("fair")
    if fair:
        alone, fifo, fair_, capped = (fair[m]["small"] for m in ("alone", "fifo", "fair", "capped"))
        big = fair["fifo"]["big_queued"]
        ratio = fair_["p50"] / max(alone["p50"], 1e-9)
        rows.append((f"small user's p50 wait, big user {big:,} queued (n={fair_['n']})", _s(fifo["p50"], "ms"),
                     _s(fair_["p50"], "ms"), f"<= {TARGET_SMALL_P50_RATIO:g}x alone",
                     f"{verdict(ratio <= TARGET_SMALL_P50_RATIO)} ({ratio:.1f}x)"))
        rows.append(("small user's p99 wait, same", _s(fifo["p99"], "ms"), _s(fair_["p99"], "ms"), "", ""))
        # Fair shares order the queue; only spare capacity removes the wait for a runner to finish.
        capped_ratio = capped["p50"] / max(alone["p50"], 1e-9)
        rows.append((f"small user's p50 wait, fair share + MAX_RUNNING_PER_USER {8 - CAPPED_HEADROOM} of 8 runners",
                     _s(fifo["p50"], "ms"), _s(capped["p50"], "ms"), f"<= {TARGET_SMALL_P50_RATIO:g}x alone",
                     f"{verdict(capped_ratio <= TARGET_SMALL_P50_RATIO)} ({capped_ratio:.1f}x)"))
        rows.append(("small user's p99 wait, same", _s(fifo["p99"], "ms"), _s(capped["p99"], "ms"), "", ""))
        rows.append(("small user's p50 wait, no big user (the reference)", "", _s(alone["p50"], "ms"), "", ""))
    else:
        missing("fair", "small user's wait beside a big user")
    res = result.get("reservation")
    if res:
        off, on = res["off"]["fine_tune"], res["on"]["fine_tune"]
        rows.append(("fine-tune wait behind continue chats, p50 (max); reservation 1 vs none",
                     f"{_s(off['p50'], floor=bool(off['never_started']))} ({_s(off['max'])})",
                     f"{_s(on['p50'], floor=bool(on['never_started']))} ({_s(on['max'])})",
                     f"<= {POLL_WAIT_S:g} s (a poll)", verdict(on["max"] <= POLL_WAIT_S and not on["never_started"])))
    else:
        missing("reservation", "fine-tune wait behind chats")
    ageing = result.get("ageing")
    if ageing:
        off, on = ageing["off"]["new"], ageing["on"]["new"]
        rows.append((f"new-session wait under {ageing['on']['traffic_s']:g} s of continue traffic, p50 (max); "
                     "AGEING_SECONDS 2 vs 0",
                     f"{_s(off['p50'])} ({_s(off['max'])})", f"{_s(on['p50'])} ({_s(on['max'])})",
                     "(no target)", ""))
    else:
        missing("ageing", "new-session wait under continue traffic")
    estimate = result.get("estimate")
    if estimate and not estimate.get("present"):
        rows.append(("start estimate's error, median", "", "n/a (no estimate in the session JSON)",
                     f"<= {TARGET_ESTIMATE_PCT:g}%", "not judged"))
    elif estimate and estimate.get("n"):
        label = f"start estimate's error, median (n={estimate['n']}; 24 chats looping on 8 runners, service 10x)"
        rows.append((label, "",
                     f"{estimate['median_abs_s']:.2f} s, {estimate['median_pct']:.0f}%", f"<= {TARGET_ESTIMATE_PCT:g}%",
                     verdict(estimate["median_pct"] <= TARGET_ESTIMATE_PCT)))
    else:
        missing("estimate", "start estimate's error")
    dispatch = result.get("dispatch")
    if dispatch:
        cost = 100 * (1 - dispatch["ratio"])
        rows.append(("bench.dispatch full cycles/s, rules all off vs at their defaults", f"{dispatch['off']:.0f}/s",
                     f"{dispatch['on']:.0f}/s ({dispatch['ratio']:.2f}x)", f"cost <= {TARGET_RULES_COST_PCT:g}%",
                     f"{verdict(cost <= TARGET_RULES_COST_PCT)} ({cost:.0f}%)"))
    else:
        missing("dispatch", "bench.dispatch full cycles/s")
    scaling = result.get("scaling")
    if scaling and not scaling.get("present"):
        rows.append(("runners wanted vs a perfect scaler, step load: lag, overshoot", "",
                     "n/a (no helix_runners_wanted at /metrics or /api/v1/admin/capacity)", "", ""))
    elif scaling:
        rows.append((f"runners wanted vs a perfect scaler {scaling['perfect']}: lag, overshoot", "",
                     f"{_s(scaling['lag_s'])}, {scaling['overshoot_pct']:.0f}%", "", ""))
    else:
        missing("scaling", "runners wanted vs a perfect scaler")
    head = ("figure", "rule off", "rule on", "target", "verdict")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [f"Helix scheduling benchmark (issue 23): {result['fleet']} simulated runner processes, "
             f"{result['database']}, service {result['service_ms']:g} ms, adapter load {result['load_ms']:g} ms"
             f"{', --quick' if result['quick'] else ''}", ""]
    for n, row in enumerate([head, *rows]):
        lines.append("  ".join(c.ljust(widths[i]) if i in (0, 4) else c.rjust(widths[i])
                               for i, c in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (about 2 minutes)")
    p.add_argument("--tiny", action="store_true", help="the smoke test's counts (figures mean little)")
    p.add_argument("--only", default="", help="a comma-separated subset of warm, fair, reservation, ageing, "
                                              "estimate, dispatch, scaling")
    p.add_argument("--service-ms", type=float, default=50.0, help="a simulated chat task's service time")
    p.add_argument("--load-ms", type=float, default=300.0, help="a simulated adapter load")
    p.add_argument("--database-url", default="",
                   help="a PostgreSQL server (admin URL) to create throwaway databases in; default SQLite")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print the report; 1 if one failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    result = measure(args)
    print(report(result, args), flush=True)
    print(f"\n{time.monotonic() - started:.0f} s; command: {' '.join(getattr(sys, 'orig_argv', sys.argv))}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
