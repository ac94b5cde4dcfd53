"""Simulated runners for bench.scheduling: OS processes that speak the real worker protocol to `helix serve`.

Each process is one runner with a test-double backend: it long-polls `GET /api/v1/worker/task` for
its kinds (`kind=MODE:TYPE:MODEL`, repeated), sending the adapters it holds as `warm=KEY`; it
"loads" a task's adapter into an LRU of `adapter_slots` (sleeping `load_s`, and counting the load),
"runs" it (sleeping `service_s`, or `finetune_s` for a fine-tune, which uploads an adapter file as a
real trainer does), completes it, and reports itself (`POST /api/v1/worker/runners`: its kinds, one
slot, free, and the adapters it holds) whenever the adapters it holds change, so the API's warm
routing knows them.

The processes are started once and live for the whole benchmark: `Fleet.assign()` hands each a
`Plan` (a server, a name, kinds, service times) for one scenario and `Fleet.halt()` brings every one
back to idle, so a scenario costs no process start-up. Each task a runner finishes goes to the main
process as a `Done` record (task, session, whether its adapter had to be loaded, when).
"""

from __future__ import annotations

import http.client
import json
import logging
import multiprocessing as mp
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from bench.helix_clients import CLAIM_PATH, Http

logger = logging.getLogger(__name__)

RUNNERS_PATH = "/api/v1/worker/runners"
_HARDWARE = {"gpus": [], "cpu": {"model": "bench-sim", "cores": 1, "memory_total": 1 << 30,
                                 "memory_available": 1 << 29}}


@dataclass(frozen=True)
class Plan:
    """What one simulated runner does in one scenario."""

    host: str
    port: int
    token: str
    name: str
    kinds: tuple[str, ...]  # MODE:TYPE:MODEL
    service_s: float = 0.1
    finetune_s: float = 1.0
    load_s: float = 0.3
    adapter_slots: int = 1
    send_warm: bool = True  # send held adapters as warm= and report them (False: first come, first served)
    wait_s: float = 1.0  # the long-poll; also how long halting a waiting runner may take


@dataclass(frozen=True)
class Done:
    """One task a simulated runner finished."""

    runner: str
    task_id: int
    session_id: int
    mode: str
    adapter: str | None
    loaded: bool  # the adapter was not held: the backend paid `load_s` for it
    claimed: float  # time.monotonic() when the claim's answer arrived (one clock for every process)
    finished: float
    ok: bool


def multipart(fields: dict[str, str], file_name: str, data: bytes, field_name: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body of text fields and one file, and its content type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{file_name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post_raw(client: Http, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
    """POST a non-JSON body (a multipart upload) on `client`'s keep-alive connection."""
    client.connect()
    assert client.conn is not None
    try:
        client.conn.request("POST", path, body=body, headers={**client.headers, "Content-Type": content_type})
        resp = client.conn.getresponse()
        raw = resp.read()
    except Exception:
        client.close()
        raise
    if resp.will_close:
        client.close()
    return resp.status, json.loads(raw) if raw else None


def upload_adapter(client: Http, task_id: int, token: str, data: bytes) -> dict[str, Any]:
    """Upload a fine-tune's adapter file as a trainer does; the result that names it."""
    body, content_type = multipart({"lease_token": token, "kind": "adapter"}, "adapter.zip", data)
    status, reply = post_raw(client, f"{CLAIM_PATH}/{task_id}/files", body, content_type)
    if status != 201:
        raise RuntimeError(f"adapter upload for task {task_id}: {status} {reply}")
    return {"text": "trained", "adapter_file_id": reply["file"]["id"], "steps": 1}


class _SimRunner:
    """One runner's loop under one plan."""

    def __init__(self, plan: Plan, out: Any, halt: Any) -> None:
        self.plan, self.out, self.halt = plan, out, halt
        self.client = Http(plan.host, plan.port, plan.token, runner_name=plan.name, timeout=plan.wait_s + 30)
        self.held: OrderedDict[str, None] = OrderedDict()  # adapter keys, least recently used first
        self.loads = self.errors = 0

    def claim_path(self) -> str:
        query = [f"kind={quote(kind, safe='')}" for kind in self.plan.kinds]
        if self.plan.send_warm:
            query += [f"warm={key}" for key in self.held]
        return f"{CLAIM_PATH}?{'&'.join(query)}&wait={self.plan.wait_s:g}"

    def report(self) -> None:
        """Tell the API what this runner is and holds (one slot, free: it is about to poll again)."""
        kinds = []
        for kind in self.plan.kinds:
            mode, type_, model = kind.split(":", 2)
            kinds.append({"mode": mode, "type": type_, "model_name": model})
        body = {"hardware": _HARDWARE, "backend": "bench-sim", "kinds": kinds, "slots": {"total": 1, "busy": 0},
                "adapters": list(self.held) if self.plan.send_warm else [], "version": "bench"}
        status, reply = self.client.request("POST", RUNNERS_PATH, body)
        if status != 200:
            self.errors += 1
            logger.warning("%s: report refused: %s %s", self.plan.name, status, reply)

    def run(self) -> None:
        """Poll, run, complete and report until halted."""
        try:
            self.report()
        except (OSError, http.client.HTTPException):
            self.errors += 1
        while not self.halt.is_set():
            try:
                status, body = self.client.request("GET", self.claim_path())
            except (OSError, http.client.HTTPException):
                self.errors += 1
                time.sleep(0.2)
                continue
            if status == 204:
                continue
            if status != 200:
                self.errors += 1
                time.sleep(0.2)
                continue
            try:
                self.work(body)
            except (OSError, http.client.HTTPException, RuntimeError):
                logger.exception("%s: task %s failed", self.plan.name, body["task"]["id"])
                self.errors += 1
        self.client.close()

    def work(self, claimed: dict[str, Any]) -> None:
        """Run one claimed task on the test-double backend, complete it, report a changed adapter set."""
        claimed_at = time.monotonic()
        task, token = claimed["task"], claimed["lease"]["token"]
        adapter = (task.get("adapter") or {}).get("sha256")
        loaded = False
        if adapter is not None:
            if adapter in self.held:
                self.held.move_to_end(adapter)
            else:
                time.sleep(self.plan.load_s)  # the adapter's weights onto the GPU
                self.loads += 1
                loaded = True
                self.held[adapter] = None
                while len(self.held) > self.plan.adapter_slots:
                    self.held.popitem(last=False)
        if task["mode"] == "finetune":
            time.sleep(self.plan.finetune_s)
            result = upload_adapter(self.client, task["id"], token, f"bench-adapter-{task['id']}".encode())
        else:
            time.sleep(self.plan.service_s)
            result = {"text": "ok"}
        status, _ = self.client.request("POST", f"{CLAIM_PATH}/{task['id']}/complete",
                                        {"lease_token": token, "result": result})
        if loaded and self.plan.send_warm:
            self.report()
        self.out.put(Done(self.plan.name, task["id"], task["session_id"], task["mode"], adapter, loaded,
                          claimed_at, time.monotonic(), status == 200))


def _runner_process(index: int, control: Any, out: Any, halt: Any) -> None:
    """A simulated runner process: run each plan it is handed until halted; None ends it."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s sim-runner-{index} %(levelname)s %(message)s")
    while True:
        plan = control.get()
        if plan is None:
            return
        runner = _SimRunner(plan, out, halt)
        try:
            runner.run()
        except Exception:
            logger.exception("simulated runner %s stopped", plan.name)
        out.put(("halted", index, runner.loads, runner.errors))


@dataclass
class Fleet:
    """`size` simulated runner processes, started once, handed a plan per scenario."""

    size: int
    ctx: Any = field(default_factory=lambda: mp.get_context("spawn"))

    def __post_init__(self) -> None:
        self.out = self.ctx.Queue()
        self.halt_event = self.ctx.Event()
        self.controls = [self.ctx.Queue() for _ in range(self.size)]
        self.procs = [self.ctx.Process(target=_runner_process, args=(i, self.controls[i], self.out, self.halt_event),
                                       name=f"sim-runner-{i}", daemon=True) for i in range(self.size)]
        for proc in self.procs:
            proc.start()
        self.active = 0
        self.done: list[Done] = []
        self.halted: list[tuple[int, int, int]] = []
        self.on_done: Callable[[Done], None] | None = None
        self._lock = threading.Lock()
        self._drain = threading.Thread(target=self._read, name="fleet-reader", daemon=True)
        self._drain.start()

    def _read(self) -> None:
        while True:
            try:
                item = self.out.get()
            except (EOFError, OSError):
                return
            if item is None:
                return
            if isinstance(item, Done):
                with self._lock:
                    self.done.append(item)
                callback = self.on_done
                if callback is not None:
                    try:
                        callback(item)
                    except Exception:
                        logger.exception("on_done callback failed for task %s", item.task_id)
            else:
                with self._lock:
                    self.halted.append(item[1:])

    def assign(self, plans: list[Plan], on_done: Callable[[Done], None] | None = None) -> None:
        """Start one plan per runner process (at most `size`); the others stay idle."""
        if len(plans) > self.size:
            raise ValueError(f"{len(plans)} plans for a fleet of {self.size}")
        with self._lock:
            self.done, self.halted = [], []
        self.on_done = on_done
        self.halt_event.clear()
        for control, plan in zip(self.controls, plans, strict=False):
            control.put(plan)
        self.active = len(plans)

    def finished(self) -> list[Done]:
        """The tasks finished so far in this scenario."""
        with self._lock:
            return list(self.done)

    def halt(self, timeout: float = 60.0) -> dict[str, int]:
        """Bring every active runner back to idle (each within its long-poll); its loads and errors, summed."""
        self.halt_event.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.halted) >= self.active:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"only {len(self.halted)} of {self.active} simulated runners halted")
        self.on_done = None
        with self._lock:
            loads = sum(h[1] for h in self.halted)
            errors = sum(h[2] for h in self.halted)
        self.active = 0
        return {"loads": loads, "errors": errors}

    def close(self) -> None:
        """End every runner process."""
        for control in self.controls:
            control.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        try:
            self.out.put(None)
        except (OSError, ValueError, queue.Full):
            pass
