"""Celery + Redis, the same workload: a no-op task's latency and throughput through a prefork worker.

The Celery app is built on first access to `bench.celery_load.celery_app` (the worker is started with
`-A bench.celery_load:celery_app`), so the Helix-only runs never import Celery.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.measures import THROUGHPUT_RUNNERS, Latency, Throughput, fmt_summary
from bench.processes import ROOT, TreeMemory, stop_process

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
REDIS_URL_ENV = "HELIX_BENCH_REDIS_URL"
CELERY_QUEUE = "helix_bench"


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


def __getattr__(name: str) -> Any:  # PEP 562: `celery -A bench.celery_load:celery_app worker`
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
    cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_load:celery_app", "worker", "--pool", "prefork",
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
        logger.info("  %s", fmt_summary(out["latency"]))
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
        stop_process(proc)
        try:
            app.close()
        except Exception:
            pass
        rds.flushdb()
        logger.info("celery: worker stopped, %s flushed", args.redis_url)
    return out
