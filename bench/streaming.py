"""Streaming benchmark: how many token events one API process stores and delivers, and at what CPU.

    .venv/bin/python -m bench.streaming              # 8 runners x 8 streams x 2,000 tokens, both variants
    .venv/bin/python -m bench.streaming --quick      # 500 tokens per stream

One `helix serve` (SQLite, one process); 64 chat sessions created through the API; 8 runner
processes, each claiming 8 of them with real claims and posting their tokens through
`POST /api/v1/worker/events` as fast as the API answers (4 tokens per stream per post), then
`complete` with the full text; 64 SSE followers (one per session, in a few processes), each checking
that the text it rebuilt equals the runner's exactly. Variant `grouped`: a runner's 8 streams share
each post (group commit); `single`: each stream posts alone. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import queue
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/streaming.py` as well as `python -m bench.streaming`
    sys.path.insert(0, str(ROOT))

from bench.helix_clients import SESSIONS_PATH, session_body, spread  # noqa: E402
from bench.helix_server import HelixApi  # noqa: E402
from bench.measures import percentile  # noqa: E402
from bench.processes import TreeMemory  # noqa: E402
from bench.report import describe_machine  # noqa: E402
from bench.stream_clients import MAX_TOKENS, follower_process, full_text, runner_process  # noqa: E402
from bench.targets import show, table  # noqa: E402

logger = logging.getLogger("bench.streaming")

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
VARIANTS = ("grouped", "single")


class NotSupported(RuntimeError):
    """The API under test refuses (or does not know) a setting this run asked for."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the --quick defaults filled in."""
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 tokens per stream instead of 2,000")
    p.add_argument("--runners", type=int, default=8, help="runner processes")
    p.add_argument("--streams", type=int, default=8, help="claimed tasks each runner streams at once")
    p.add_argument("--tokens", type=int, default=None, help="tokens per stream (2000; 500 with --quick)")
    p.add_argument("--per-post", type=int, default=4, help="tokens of each stream per events post")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="grouped (a runner's streams share each post), single (one stream per post)")
    p.add_argument("--follower-procs", type=int, default=4, help="processes the SSE followers run in")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--bus", default=None, help="start the API with HELIX_BUS_URL set to this (e.g. "
                                               "redis://127.0.0.1:6379/14)")
    p.add_argument("--replicas", type=int, choices=(1, 2), default=1,
                   help="2: followers read from a second helix serve on the same PostgreSQL database")
    p.add_argument("--deadline", type=float, default=600.0, help="give up on a variant after this many s")
    p.add_argument("--api-log-level", default="WARNING", help="helix --log-level for the server")
    p.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL,
                   help="PostgreSQL to create the throwaway helix_bench_* database in")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (500 if args.quick else 2000)
    if not 1 <= args.tokens <= MAX_TOKENS:
        p.error(f"--tokens: 1..{MAX_TOKENS}")
    if min(args.runners, args.streams, args.per_post, args.follower_procs) < 1:
        p.error("--runners, --streams, --per-post and --follower-procs must be at least 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants: a comma-separated subset of {', '.join(VARIANTS)}")
    if args.replicas == 2:
        args.db = "postgres"
    args.api_workers, args.api_threads = 1, None  # what HelixApi reads: one API process per server
    return args


def _check_bus(args: argparse.Namespace) -> None:
    """Refuse --bus in one line when this helix_api has no HELIX_BUS_URL setting (it would be ignored)."""
    if not args.bus:
        return
    from helix_api.config import Config

    if not hasattr(Config, "BUS_URL"):
        raise NotSupported("--bus: this helix_api has no HELIX_BUS_URL setting (issue 12's bus has not "
                           "landed), so the server would ignore it")


def _start(api: HelixApi, threads: int, what: str) -> None:
    try:
        api.start(threads)
    except RuntimeError as exc:
        # The exception's own line says why (gunicorn's last line only says a worker did not boot).
        lines = [line.strip() for line in api.log_tail().splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
        why = (errors or lines or [str(exc)])[-1]
        raise NotSupported(f"{what} refused to start: {why}") from exc


def _collect(out: Any, want: dict[str, int], deadline: float) -> dict[str, list[Any]]:
    """Messages from the client processes until `want[kind]` of each kind came (or the deadline)."""
    got: dict[str, list[Any]] = {k: [] for k in want}
    while any(len(got[k]) < n for k, n in want.items()) and time.monotonic() < deadline:
        try:
            msg = out.get(timeout=0.5)
        except queue.Empty:
            continue
        if msg[0] == "runner_failed":
            raise RuntimeError(f"runner {msg[1]} failed: {msg[2]}")
        got.setdefault(msg[0], []).append(msg[1:])
    return got


def run_variant(ctx: Any, api: HelixApi, follow_api: HelixApi, args: argparse.Namespace, variant: str,
                monitor: TreeMemory, follow_monitor: TreeMemory | None) -> dict[str, Any]:
    """One variant: create the sessions, open the followers, claim, stream, complete; the figures."""
    model, n = f"bench/stream-{variant}", args.runners * args.streams
    user = api.user_client()
    sessions = []
    for _ in range(n):
        status, body = user.request("POST", SESSIONS_PATH, session_body(model, "stream to me"))
        if status != 201:
            raise RuntimeError(f"creating a session answered {status}: {body}")
        sessions.append(body["id"])
    out, go = ctx.Queue(), ctx.Event()
    procs = []
    fcfg = {"host": follow_api.host, "port": follow_api.port, "key": api.key, "timeout": 60.0,
            "deadline": args.deadline, "tokens": args.tokens}
    parts = spread(n, min(args.follower_procs, n))
    for i, count in enumerate(parts):
        start = sum(parts[:i])
        procs.append(ctx.Process(target=follower_process, args=(fcfg, sessions[start:start + count], out),
                                 daemon=True))
    for r in range(args.runners):
        cfg = api.runner_cfg(name=f"stream-{variant}-{r}", model=model, streams=args.streams,
                             tokens=args.tokens, per_post=args.per_post, grouped=variant == "grouped")
        procs.append(ctx.Process(target=runner_process, args=(cfg, go, out), daemon=True))
    for proc in procs:
        proc.start()
    finished = False
    try:
        ready = _collect(out, {"following": len(parts), "claimed": args.runners}, time.monotonic() + 120)
        claimed = sum(len(m[1]) for m in ready["claimed"])
        if len(ready["following"]) < len(parts) or claimed != n:
            raise RuntimeError(f"not ready: {len(ready['following'])} of {len(parts)} follower processes, "
                               f"{claimed} of {n} tasks claimed")
        cpu0, t0 = monitor.cpu_seconds(), time.monotonic()
        fcpu0 = follow_monitor.cpu_seconds() if follow_monitor else 0.0
        go.set()
        done = _collect(out, {"runner_done": args.runners, "follower_done": len(parts)},
                        t0 + args.deadline + 30)
        cpu1, fcpu1 = monitor.cpu_seconds(), follow_monitor.cpu_seconds() if follow_monitor else 0.0
        finished = True
    finally:
        for proc in procs:
            proc.join(timeout=10 if finished else 0)  # a failed start leaves runners waiting on `go`
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    monitor.phase_end(variant)
    rss_mb, monitor.peak_sum = monitor.peak_sum / 2**20, 0  # each variant's own peak
    runners = [m[0] for m in done["runner_done"]]
    streams = [s for m in done["follower_done"] for s in m[0]["streams"]]
    stored_ok = _stored_outputs(user, sessions, args.tokens)
    user.close()
    figures = _figures(args, runners, streams, done, t0, cpu1 - cpu0,
                       fcpu1 - fcpu0 if follow_monitor else None, stored_ok, n)
    return {**figures, "rss_mb": rss_mb}


def _stored_outputs(user: Any, sessions: list[int], tokens: int) -> int:
    """How many sessions' stored reply equals the runner's text (read back through the API)."""
    ok = 0
    for sid in sessions:
        status, body = user.request("GET", f"{SESSIONS_PATH}/{sid}")
        if status == 200 and body["interactions"][-1].get("output") == full_text(sid, tokens):
            ok += 1
    return ok


def _figures(args: argparse.Namespace, runners: list[dict], streams: list[dict], done: dict, t0: float,
             api_cpu: float, follow_cpu: float | None, stored_ok: int, n: int) -> dict[str, Any]:
    sent = {sid: times for r in runners for sid, times in r["sent"].items()}
    lags = [(at - sent[s["session_id"]][i // args.per_post]) * 1000
            for s in streams if s["session_id"] in sent for i, at in enumerate(s["received"])]
    stored = sum(r["stored"] for r in runners)
    delivered = sum(s["tokens"] for s in streams)
    last_post = max((r["last_post"] for r in runners), default=0.0)
    last_received = max((s["last_received"] for s in streams if s["last_received"]), default=0.0)
    stored_s, delivered_s = last_post - t0, last_received - t0
    runner_cpu = sum(r["cpu"] for r in runners)
    follower_cpu = sum(m[0]["cpu"] for m in done["follower_done"])
    problems = [p for r in runners for p in r["problems"]]
    problems += [f"session {s['session_id']}: {s['problem']}" for s in streams if not s["ok"]]
    if len(runners) < args.runners or len(streams) < n:
        problems.append(f"only {len(runners)} of {args.runners} runners and {len(streams)} of {n} "
                        "followers reported before the deadline")
    per_1k = 1e6 / delivered if delivered else None
    out = {
        "tokens": n * args.tokens, "stored": stored, "delivered": delivered,
        "stored_per_s": stored / stored_s if stored_s > 0 else None,
        "delivered_per_s": delivered / delivered_s if delivered_s > 0 else None,
        "posts": sum(r["posts"] for r in runners), "completed": sum(r["completed"] for r in runners),
        "api_cpu_ms_per_1k": api_cpu * per_1k if per_1k else None,
        "follow_api_cpu_ms_per_1k": follow_cpu * per_1k if per_1k and follow_cpu is not None else None,
        "client_cpu_ms_per_1k": (runner_cpu + follower_cpu) * per_1k if per_1k else None,
        "runner_cpu_ms_per_1k": runner_cpu * per_1k if per_1k else None,
        "follower_cpu_ms_per_1k": follower_cpu * per_1k if per_1k else None,
        "lag_p50_ms": percentile(lags, 50) if lags else None,
        "lag_p99_ms": percentile(lags, 99) if lags else None,
        "texts_ok": sum(s["ok"] for s in streams), "stored_texts_ok": stored_ok, "streams": n,
        "reconnects": sum(s["reconnects"] for s in streams), "restarts": sum(s["restarts"] for s in streams),
        "errors": sum(r["errors"] for r in runners), "problems": problems[:20],
    }
    out["tokens_per_s"] = min(out["stored_per_s"] or 0.0, out["delivered_per_s"] or 0.0)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected variant against one server (two with --replicas 2); the figures per variant."""
    _check_bus(args)
    ctx = mp.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix="helix-bench-stream-"))
    models = [f"bench/stream-{v}" for v in args.variants]
    api = HelixApi(args.db, workdir, args, models)
    if args.bus:
        api.env["HELIX_BUS_URL"] = args.bus
    follow_api, monitors = api, []
    result: dict[str, Any] = {"variants": {}}
    ok = False
    # every follower holds a thread while it streams; every posting connection wants one too
    threads = args.runners * args.streams * 2 + args.runners + 16
    try:
        api.setup()
        _start(api, threads, "helix serve" + (f" with HELIX_BUS_URL={args.bus}" if args.bus else ""))
        monitors.append(TreeMemory(api.proc.pid))
        result["command"], result["server"] = api.command, api.banner
        if args.replicas == 2:
            follow_api = HelixApi("replica-2", workdir, args, models)
            follow_api.env, follow_api.key, follow_api.token = dict(api.env), api.key, api.token
            _start(follow_api, threads, "the second replica")
            monitors.append(TreeMemory(follow_api.proc.pid))
            result["replica"] = f"{follow_api.command}  [{follow_api.banner}]"
        for variant in args.variants:
            logger.info("streaming, %s: %d runners x %d streams x %d tokens, %d per post", variant,
                        args.runners, args.streams, args.tokens, args.per_post)
            figs = run_variant(ctx, api, follow_api, args, variant, monitors[0],
                               monitors[1] if len(monitors) > 1 else None)
            logger.info("  %s", {k: v for k, v in figs.items() if k != "problems"})
            result["variants"][variant] = figs
        ok = True
    except NotSupported:
        ok = True  # the one line says it all: no logs to keep
        raise
    except Exception:
        logger.error("streaming run failed; API log tail:\n%s", api.log_tail())
        raise
    finally:
        peaks = [monitor.stop()["rss_sum_mb"] for monitor in monitors]
        if len(peaks) > 1:
            result["replica_rss_mb"] = peaks[1]
        for server in {id(follow_api): follow_api, id(api): api}.values():
            server.stop()
        api.teardown()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            logger.error("logs kept in %s", workdir)
    return result


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The printed report: the setup, then one column per variant."""
    machine = describe_machine()
    variants = result["variants"]
    lines = ["Helix streaming benchmark",
             f"command: {' '.join(getattr(sys, 'orig_argv', sys.argv))}",
             f"machine: {machine['logical_cpus']} logical CPUs, {machine['cpu']}, load avg {machine['loadavg']}",
             f"server: {result.get('command', '?')}  [{result.get('server', '')}]"
             + (f"; HELIX_BUS_URL={args.bus}" if args.bus else "")]
    if result.get("replica"):
        lines.append(f"followers on: {result['replica']}; its RSS peak {show(result.get('replica_rss_mb'), 'MB')}")
    lines.append(f"load: {args.runners} runner processes x {args.streams} claimed tasks, {args.tokens} tokens of "
                 f"5 characters per stream, {args.per_post} per stream per post, as fast as the API answers; "
                 f"{args.runners * args.streams} SSE followers in {args.follower_procs} process(es)")
    lines.append("")
    figure_rows = [
        ("tokens/s stored and delivered (the lower)", "tokens_per_s", "/s"),
        ("  tokens/s stored (posts acknowledged)", "stored_per_s", "/s"),
        ("  tokens/s delivered (reached followers)", "delivered_per_s", "/s"),
        ("API CPU ms per 1,000 tokens", "api_cpu_ms_per_1k", "ms"),
        ("  second replica's CPU ms per 1,000 tokens", "follow_api_cpu_ms_per_1k", "ms"),
        ("benchmark clients' CPU ms per 1,000 tokens", "client_cpu_ms_per_1k", "ms"),
        ("  runners' / followers' share", None, ""),
        ("API RSS peak (server process tree)", "rss_mb", "MB"),
        ("follower lag p50 (post sent -> token received)", "lag_p50_ms", "ms"),
        ("follower lag p99", "lag_p99_ms", "ms"),
        ("events posts", "posts", ""),
        ("followers whose text equals the runner's", "texts_ok", ""),
        ("stored replies equal to the runner's text", "stored_texts_ok", ""),
        ("follower reconnects / restarted attempts", None, ""),
        ("runner errors", "errors", ""),
    ]
    cells = [["figure", *variants]]
    for label, key, unit in figure_rows:
        if key == "follow_api_cpu_ms_per_1k" and args.replicas == 1:
            continue
        if key is None and "share" in label:
            cells.append([label, *(f"{show(v.get('runner_cpu_ms_per_1k'))} / {show(v.get('follower_cpu_ms_per_1k'))}"
                                   for v in variants.values())])
        elif key is None:
            cells.append([label, *(f"{v['reconnects']} / {v['restarts']}" for v in variants.values())])
        else:
            cells.append([label, *(show(v.get(key), unit) for v in variants.values())])
    lines.append(table(cells))
    lines.append("")
    for name, v in variants.items():
        lines.append(f"{name} problems: " + ("; ".join(v["problems"]) if v["problems"] else "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run, print the report; 2 when the server refuses a setting, 1 when a variant failed a check."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = measure(args)
    except NotSupported as exc:
        print(f"streaming: not run: {exc}", flush=True)
        return 2
    print(report(result, args), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if all(not v["problems"] for v in result["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
