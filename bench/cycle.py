"""One dispatch cycle, taken apart: API CPU per request kind, HTTP requests and SQL statements per cycle.

Two protocols, both against a real `helix serve`:
- **seed**: what any client of the seed's protocol does: create a session, claim one task (no `max`),
  complete it plainly. Three requests a cycle.
- **runner**: what helix-runner does: the same creates, then `GET /task?max=8`, and each `complete`
  with `claim_next`, which hands back the runner's next task.

Each request kind runs as its own phase (all the creates, then all the claims, then all the
completes), so the server's CPU over a phase divided by its requests is that kind's cost. The
server's CPU is read from its process tree (psutil), which a noisy machine does not inflate the way
it inflates wall time. `--source DIR` serves another checkout (an older commit in a worktree), so the
old and the new code are measured side by side in one run:

    .venv/bin/python -m bench.cycle                                   # this checkout, SQLite and PostgreSQL
    .venv/bin/python -m bench.cycle --source /tmp/helix-old --source .   # before and after, one run
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench import helix_server
from bench.helix_clients import Http, session_body
from bench.helix_server import HelixApi
from bench.processes import ROOT, TreeMemory

logger = logging.getLogger(__name__)

MODEL = "bench/cycle-model"
DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# Counts one cycle's SQL statements in-process, through the app's test client, for any checkout:
# run with that checkout first on sys.path (`python -c`), it prints a JSON object.
_COUNT = r"""
import json, os, sys, tempfile
from sqlalchemy import event
try:
    from helix_api.accounts.auth import create_runner_token, create_user
except ImportError:
    from helix_api.auth import create_runner_token, create_user
from helix_api.app import create_app
from helix_api.services import services
url = sys.argv[1]
data = tempfile.mkdtemp()
app = create_app({"DATABASE_URL": url or f"sqlite:///{data}/helix.db", "DATA_DIR": data, "AUTO_UPGRADE": True,
                  "MODELS": "text:" + sys.argv[2], "FILES_DIR": data + "/files"})
with app.app_context():
    svc = services()
    db = svc.database
    svc.scheduler.reap_every = float("inf")
session = getattr(db, "orm_write", None) or db.write
with session() as s:
    _, key = create_user(s, "counter-" + os.urandom(3).hex())
    token = create_runner_token(s, "counter")
client = app.test_client()
user, runner = {"Authorization": "Bearer " + key}, {"Authorization": "Bearer " + token}
claim = "/api/v1/worker/task?mode=create&type=text&model_name=" + sys.argv[2]
body = {"mode": "create", "type": "text", "model_name": sys.argv[2], "message": "hi"}
seen = []
event.listen(db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
out = {}
for rnd in range(2):
    seen.clear(); client.post("/api/v1/sessions", headers=user, json=body); out["create"] = len(seen)
    seen.clear(); c = client.get(claim, headers=runner).json; out["claim"] = len(seen)
    seen.clear()
    client.post(f"/api/v1/worker/task/{c['task']['id']}/complete", headers=runner,
                json={"lease_token": c["lease"]["token"], "result": {"text": "ok"}})
    out["complete"] = len(seen)
print(json.dumps(out))
"""


def _serve_from(source: Path) -> None:
    """Make `HelixApi` start `helix` from `source`, whatever its CLI module is called there."""
    module = "helix_api.cli.operator" if (source / "helix_api" / "cli" / "operator.py").exists() else "helix_api.cli"
    code = f"import sys; sys.path.insert(0, {str(source)!r}); from {module} import main; main()"
    helix_server._console_script = lambda name: [sys.executable, "-c", code]


def count_statements(source: Path, pg_url: str | None) -> dict[str, int]:
    """SQL statements of one create, claim and complete in `source`'s code (second round: caches warm)."""
    done = subprocess.run([sys.executable, "-c", _COUNT, pg_url or "", MODEL], cwd=source, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _phase(cpu: TreeMemory, count: int, step) -> tuple[float, int]:
    """Run `step` `count` times; the server's CPU ms per step and the requests made."""
    before = cpu.cpu_seconds()
    requests = sum(step(i) for i in range(count))
    return 1000 * (cpu.cpu_seconds() - before) / count, requests


def measure_api(api: HelixApi, cycles: int) -> dict[str, Any]:
    """API CPU per request kind for both protocols, on a started `api`."""
    cpu = TreeMemory(api.proc.pid)
    user = Http(api.host, api.port, api.key)
    runner = Http(api.host, api.port, api.token, runner_name="bench-cycle")
    claim = f"/api/v1/worker/task?mode=create&type=text&model_name={quote(MODEL, safe='')}"

    def create(_: int) -> int:
        status, body = user.request("POST", "/api/v1/sessions", session_body(MODEL))
        assert status == 201, (status, body)
        return 1

    held: list[dict[str, Any]] = []

    def take(_: int) -> int:
        status, body = runner.request("GET", claim)
        assert status == 200, status
        held.append(body)
        return 1

    def complete(i: int) -> int:
        task = held[i]
        status, _ = runner.request("POST", f"/api/v1/worker/task/{task['task']['id']}/complete",
                                   {"lease_token": task["lease"]["token"], "result": {"text": "ok"}})
        assert status == 200, status
        return 1

    for i in range(20):  # warm: keys cached, statements compiled, the runner's row written
        create(i), take(i), complete(i)
    held.clear()
    out: dict[str, Any] = {"seed": {}, "runner": {}}
    out["seed"]["create_ms"], _ = _phase(cpu, cycles, create)
    out["seed"]["claim_ms"], _ = _phase(cpu, cycles, take)
    out["seed"]["complete_ms"], _ = _phase(cpu, cycles, complete)
    out["seed"]["requests"] = 3.0
    out["seed"]["cycle_ms"] = sum(out["seed"][k] for k in ("create_ms", "claim_ms", "complete_ms"))

    # helix-runner: claim max=8, then every complete claims the next task of the queue.
    out["runner"]["create_ms"], _ = _phase(cpu, cycles, create)
    state = {"held": [], "done": 0, "requests": 0}
    before = cpu.cpu_seconds()
    while state["done"] < cycles:
        if not state["held"]:
            status, body = runner.request("GET", claim + "&max=8")
            state["requests"] += 1
            assert status == 200, status
            state["held"] = body["tasks"]
        task = state["held"].pop(0)
        status, body = runner.request("POST", f"/api/v1/worker/task/{task['task']['id']}/complete",
                                      {"lease_token": task["lease"]["token"], "result": {"text": "ok"},
                                       "claim_next": True})
        state["requests"] += 1
        assert status == 200, status
        state["done"] += 1
        if body.get("next"):
            state["held"].append(body["next"])
    out["runner"]["claim_and_complete_ms"] = 1000 * (cpu.cpu_seconds() - before) / cycles
    out["runner"]["requests"] = 1 + state["requests"] / cycles
    out["runner"]["cycle_ms"] = out["runner"]["create_ms"] + out["runner"]["claim_and_complete_ms"]
    user.close()
    runner.close()
    return out


QUICK_CYCLES = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, action="append", default=None,
                   help="a checkout to serve (repeatable; default: this one); the last is the one judged")
    p.add_argument("--only", default="sqlite,postgres")
    p.add_argument("--cycles", type=int, default=400)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_CYCLES} cycles")
    p.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every backend and source in `args`: rows for the report, and the last source's figures by backend."""
    args.api_log_level, args.api_workers, args.api_threads = "WARNING", 1, None
    cycles = QUICK_CYCLES if args.quick else args.cycles
    sources = [s.resolve() for s in (args.source or [ROOT])]
    rows, current = [], {}
    for backend in args.only.split(","):
        for source in sources:
            _serve_from(source)
            with tempfile.TemporaryDirectory() as tmp:
                api = HelixApi(backend, Path(tmp), args, [MODEL])
                api.env["PYTHONPATH"] = str(source)
                try:
                    api.setup()
                    api.start()
                    time.sleep(1)
                    figures = measure_api(api, cycles)
                    figures["statements"] = count_statements(
                        source, api.env.get("HELIX_DATABASE_URL") if backend == "postgres" else None)
                finally:
                    api.stop()
                    api.teardown()
            rows.append({"backend": backend, "source": str(source), **figures})
            current[backend] = figures
            logger.info("%s %s: %s", backend, source, figures)
    return {"cycles": cycles, "rows": rows, "current": current}


def report(result: dict[str, Any], args: argparse.Namespace | None = None) -> str:
    """The table of every row measured."""
    lines = [f"One cycle, {result['cycles']} of each request kind, `helix serve --workers 1` "
             "(API CPU ms, from the server's process tree)",
             "| db | code | create | claim | complete | seed cycle (3 req) | runner claim+complete "
             "| runner cycle (req) | SQL create/claim/complete |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s, n, q = r["seed"], r["runner"], r["statements"]
        lines.append(f"| {r['backend']} | {r['source']} | {s['create_ms']:.2f} | {s['claim_ms']:.2f} "
                     f"| {s['complete_ms']:.2f} | {s['cycle_ms']:.2f} | {n['claim_and_complete_ms']:.2f} "
                     f"| {n['cycle_ms']:.2f} ({n['requests']:.2f}) | {q['create']}/{q['claim']}/{q['complete']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    result = measure(args)
    print()
    print(report(result, args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
