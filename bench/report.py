"""The printed report: the machine, the versions, how the load was made, one table and the problems."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.helix_clients import runner_layout
from bench.measures import SHORT_POLL_PERIOD, THROUGHPUT_RUNNERS
from bench.processes import ROOT

TARGETS = {
    "lp_p50_ms": 2.0,  # long-poll p50 with 100 runners waiting
    "lp_p99_ms": 10.0,  # long-poll p99 with 100 runners waiting
    "sqlite_cycles": 600.0,  # full cycles per second on SQLite
    "rss_mb": 150.0,  # API RSS, master + workers
}


def describe_machine() -> dict[str, Any]:
    """Cores, CPU model, memory, load average and versions of this machine."""
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


def package_versions(args: argparse.Namespace) -> dict[str, str]:
    """Versions of the packages under test, and of the PostgreSQL server when it is used."""
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
    layout = {n: runner_layout(n) for n in args.runners}
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
    tput_layout = "+".join(map(str, runner_layout(THROUGHPUT_RUNNERS)))
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
