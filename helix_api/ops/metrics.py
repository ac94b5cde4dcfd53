"""The API's Prometheus metrics: what happens is counted where it happens, what is read from SQL.

Events (claims, attempts that end, tokens, requests) are counters and histograms in the process that
saw them. Under gunicorn's several workers, `helix serve` points PROMETHEUS_MULTIPROC_DIR at a fresh
folder before forking, so prometheus_client keeps every worker's figures in files there and a scrape
of any worker sums them all (a dead worker's counts stay). State (queue depth, tasks running, runners
live) is read from SQL at scrape time: it is already there, the same whichever process answers, and
right after a restart. See notes.md, "Metrics".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from helix_api.accounts import usage
from helix_api.db import Database
from helix_api.ops import overview
from helix_api.tasks import estimates
from helix_api.vocabulary import AttemptEnd

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
KIND = ("mode", "type", "model")
# Seconds: from a blink to a long queue (a GPU fleet under load waits minutes).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Its own registry, so a scrape shows Helix's figures and nothing a library registered by default.
REGISTRY = CollectorRegistry(auto_describe=True)

QUEUE_WAIT = Histogram("helix_queue_wait_seconds", "Time a task waited in its queue before a runner claimed it.",
                       KIND, buckets=WAIT_BUCKETS, registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram(
    "helix_time_to_first_token_seconds",
    "From a task's (re)queueing to its attempt's first token reaching the API: queue, load, prefill.",
    ("model",), buckets=WAIT_BUCKETS, registry=REGISTRY)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "helix_time_per_output_token_seconds",
    "A completed reply's time from its first token to its end, per further output token.",
    ("model",), buckets=TOKEN_BUCKETS, registry=REGISTRY)
TASKS_FINISHED = Counter("helix_tasks_finished_total", "Tasks that reached an end state, by outcome.",
                         ("outcome", *KIND), registry=REGISTRY)
REQUEUES = Counter("helix_task_requeues_total",
                   "Attempts that sent their task back to the queue: failed (retry), lease_expired or released.",
                   ("reason", *KIND), registry=REGISTRY)
LEASE_EXPIRIES = Counter("helix_lease_expiries_total", "Leases that ran out (their runner died or hung).",
                         KIND, registry=REGISTRY)
GENERATED_TOKENS = Counter("helix_generated_tokens_total", "Output tokens of completed tasks, as runners report them.",
                           ("model",), registry=REGISTRY)
PROMPT_TOKENS = Counter("helix_prompt_tokens_total", "Prompt tokens of completed tasks, as runners report them.",
                        ("model",), registry=REGISTRY)
IMAGES = Counter("helix_images_total", "Images made by completed tasks.", ("model",), registry=REGISTRY)
REQUESTS = Histogram("helix_http_request_duration_seconds",
                     "Time to answer an API request (a stream: to its first byte), per endpoint group.",
                     ("group", "method", "status"), buckets=REQUEST_BUCKETS, registry=REGISTRY)


def _kind(task: Any) -> tuple[str, str, str]:
    return task.mode.value, task.type.value, task.model_name


def claimed(task: Any) -> None:
    """A runner claimed `task` (a row with queued_at and claimed_at)."""
    if task.claimed_at is not None and task.queued_at is not None:
        QUEUE_WAIT.labels(*_kind(task)).observe(max((task.claimed_at - task.queued_at).total_seconds(), 0.0))


def first_token(task: Any, now: datetime) -> None:
    """The first token of `task`'s current attempt reached this process."""
    TIME_TO_FIRST_TOKEN.labels(task.model_name).observe(max((now - task.queued_at).total_seconds(), 0.0))


def time_per_token(model: str, seconds: float, tokens: int) -> None:
    """A reply took `seconds` from its first token to its end, over `tokens` output tokens."""
    if tokens > 1:
        TIME_PER_OUTPUT_TOKEN.labels(model).observe(max(seconds, 0.0) / (tokens - 1))


def ended(task: Any, outcome: AttemptEnd, result: Mapping[str, Any] | None = None, *,
          lease_expired: bool = False) -> None:
    """An attempt at `task` ended as `outcome` (committed): the counters it moves."""
    kind = _kind(task)
    if outcome == AttemptEnd.RETRIED:
        REQUEUES.labels("lease_expired" if lease_expired else "failed", *kind).inc()
    elif outcome == AttemptEnd.RELEASED:
        REQUEUES.labels("released", *kind).inc()
    else:
        TASKS_FINISHED.labels(outcome.value, *kind).inc()
    if lease_expired:
        LEASE_EXPIRIES.labels(*kind).inc()
    if outcome == AttemptEnd.COMPLETE:
        prompt, completion = usage.counts(result)
        GENERATED_TOKENS.labels(task.model_name).inc(completion)
        PROMPT_TOKENS.labels(task.model_name).inc(prompt)
        IMAGES.labels(task.model_name).inc(usage.images_of(task, result))


def request_done(group: str, method: str, status: int, seconds: float) -> None:
    """An API request was answered."""
    REQUESTS.labels(group, method, f"{status // 100}xx").observe(seconds)


class StateCollector:
    """Gauges read from SQL at scrape time: queue depth, tasks running, the oldest wait, runners live and wanted."""

    def __init__(self, database: Database, target_wait: float = 30.0) -> None:
        self.database, self.target_wait = database, target_wait

    def describe(self) -> list[Metric]:
        """Nothing up front: describing must not query the database."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The gauges, or `helix_database_up 0` alone when the database cannot be read."""
        up = GaugeMetricFamily("helix_database_up", "1 when this scrape could read the database.")
        try:
            with self.database.connect() as conn:
                depths = overview.queue_depths(conn)
                shops = estimates.shops(conn)
        except Exception:
            logger.warning("metrics: the database could not be read for this scrape", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        queued = GaugeMetricFamily("helix_queue_depth", "Tasks waiting for a runner.", labels=KIND)
        running = GaugeMetricFamily("helix_tasks_running", "Tasks a runner holds now.", labels=KIND)
        oldest = GaugeMetricFamily("helix_queue_oldest_wait_seconds", "How long the oldest queued task has waited.",
                                   labels=KIND)
        seen = set()
        for entry in depths:
            labels = [entry["mode"], entry["type"], entry["model_name"]]
            seen.add(tuple(labels))
            queued.add_metric(labels, entry["queued"])
            running.add_metric(labels, entry["running"])
            oldest.add_metric(labels, entry["oldest_queued_seconds"] or 0.0)
        alive = GaugeMetricFamily("helix_runners_live", "Runners heard from in the last minute that serve the kind.",
                                  labels=KIND)
        wanted = GaugeMetricFamily(
            "helix_runners_wanted",
            "Runners that would start queued work within TARGET_WAIT_SECONDS (an autoscaler's target).", labels=KIND)
        for shop in shops:
            labels = list(shop.kind)
            alive.add_metric(labels, shop.runners)
            wanted.add_metric(labels, shop.runners_wanted(self.target_wait))
            if tuple(labels) not in seen:  # an empty queue that runners serve reads 0, rather than vanishing
                for family in (queued, running, oldest):
                    family.add_metric(labels, 0)
        yield from (queued, running, oldest, alive, wanted)


def multiprocess_dir() -> str | None:
    """Where gunicorn's workers keep their figures, when they share them (set by `helix serve`)."""
    return os.environ.get(MULTIPROCESS_ENV) or None


def exposition(database: Database, target_wait: float = 30.0) -> bytes:
    """Every metric in Prometheus' text format: every process's events, and the state in SQL now
    (`target_wait`: TARGET_WAIT_SECONDS, which `helix_runners_wanted` is sized for)."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        registry.register(REGISTRY)
    registry.register(StateCollector(database, target_wait))
    return generate_latest(registry)


def mark_process_dead(pid: int) -> None:
    """Tidy what a worker that exited left in the multiprocess folder (gunicorn's child_exit)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
