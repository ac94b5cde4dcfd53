"""The Helix phases: long- and short-poll dispatch latency and full-cycle throughput on one database."""

from __future__ import annotations

import argparse
import http.client
import logging
import queue
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.helix_clients import (
    SESSIONS_PATH,
    STOP_MESSAGE,
    producer_process,
    runner_layout,
    runner_process,
    session_body,
    spread,
)
from bench.helix_server import HelixApi
from bench.measures import SHORT_POLL_PERIOD, THROUGHPUT_RUNNERS, Latency, Throughput, fmt_summary
from bench.processes import TreeMemory

logger = logging.getLogger(__name__)


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
    for threads in runner_layout(runners):
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
            client.request("POST", SESSIONS_PATH, session_body(model, STOP_MESSAGE), parse=False)
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
                    warmup: int, monitor: TreeMemory | None = None, idle_seconds: float = 1.5,
                    settle_seconds: float = 0.5) -> Latency:
    """Create one task at a time while `runners` wait; time create sent -> claim received.

    Before the first task, the API's CPU is measured over `idle_seconds` once the runners have had
    `settle_seconds` to reach their long-polls (with `monitor`).
    """
    label = f"{'long' if mode == 'long' else 'short'}-poll, {runners} runner(s)"
    result = Latency(label)
    out, stop = ctx.Queue(), ctx.Event()
    counter = ctx.Value("q", 0)
    cfg = api.runner_cfg(model=model, mode=mode, wait=30, period=SHORT_POLL_PERIOD, purpose="latency")
    procs = _start_runners(ctx, cfg, runners, out, stop, counter)
    time.sleep(settle_seconds)  # let every long-poll reach the server
    if monitor is not None:  # what waiting runners cost the API while nothing is queued
        cpu0, t0 = monitor.cpu_seconds(), time.monotonic()
        time.sleep(idle_seconds)
        result.idle_cpu_pct = 100 * (monitor.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    client = api.user_client()
    client.connect()
    body = session_body(model)
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
    per_thread = spread(tasks, producers)
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
                logger.info("  %s", fmt_summary(out[mode][n]))
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
