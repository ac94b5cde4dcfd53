"""What the benchmark measures: the workload's fixed shape, latency and throughput records, percentiles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

THROUGHPUT_RUNNERS = 8  # the "8 concurrent runners"; Celery gets --concurrency 8 to match
SHORT_POLL_PERIOD = 1.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Latency:
    """Dispatch latency samples of one configuration, in milliseconds."""

    label: str
    sent_ms: list[float] = field(default_factory=list)  # create sent -> claim received
    acked_ms: list[float] = field(default_factory=list)  # create acknowledged -> claim received
    lost: int = 0  # samples whose claim never came back in time
    errors: int = 0
    seconds: float = 0.0
    idle_cpu_pct: float | None = None  # API CPU while the runners wait and nothing is queued

    def summary(self) -> dict[str, Any]:
        """p50/p99 of both measures, and the counts."""
        out: dict[str, Any] = {"label": self.label, "samples": len(self.sent_ms), "lost": self.lost,
                               "errors": self.errors, "seconds": round(self.seconds, 1),
                               "idle_cpu_pct": self.idle_cpu_pct}
        for name, values in (("sent", self.sent_ms), ("acked", self.acked_ms)):
            if values:
                out[f"{name}_p50_ms"] = percentile(values, 50)
                out[f"{name}_p99_ms"] = percentile(values, 99)
                out[f"{name}_max_ms"] = max(values)
        return out


@dataclass
class Throughput:
    """A full-cycle throughput run."""

    tasks: int
    created: int = 0
    completed: int = 0
    seconds: float = 0.0
    create_seconds: float = 0.0  # first create sent -> last create acknowledged
    errors: int = 0
    note: str = ""
    server_cpu_ms: float | None = None  # API (or Celery worker) CPU per completed task
    client_cpu_ms: float | None = None  # this benchmark's producers and runners, per completed task
    producer_messages: list = field(default_factory=list, repr=False)

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


def fmt_summary(s: dict[str, Any]) -> str:
    """One log line for a `Latency.summary()`."""
    if "sent_p50_ms" not in s:
        return f"{s['label']}: no samples (lost {s['lost']}, errors {s['errors']})"
    return (f"{s['label']}: sent->claim p50 {s['sent_p50_ms']:.2f} ms p99 {s['sent_p99_ms']:.2f} ms "
            f"max {s['sent_max_ms']:.1f} ms; acked->claim p50 {s['acked_p50_ms']:.2f} ms; "
            f"n={s['samples']} lost={s['lost']} errors={s['errors']} in {s['seconds']}s; idle API CPU "
            f"{s['idle_cpu_pct'] if s.get('idle_cpu_pct') is not None else float('nan'):.1f}%")
