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
import json
import logging
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/dispatch.py` as well as `python -m bench.dispatch`
    sys.path.insert(0, str(ROOT))

from bench.celery_load import DEFAULT_REDIS_URL, run_celery  # noqa: E402
from bench.helix_load import run_helix  # noqa: E402
from bench.report import build_report, describe_machine, package_versions  # noqa: E402

logger = logging.getLogger("bench.dispatch")

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the --quick defaults filled in."""
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
    """Run the selected backends, print the report; 1 if any of them failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    machine = describe_machine()
    versions = package_versions(args)
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
