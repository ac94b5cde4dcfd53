"""The runner's Prometheus metrics, served with `--metrics-port`: tasks, tokens, slots, adapters, the model, GPUs.

Metric objects exist whether or not they are served, so recording costs the same either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)
RATE_BUCKETS = (1, 2.5, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 800)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TASKS = Counter("helix_runner_tasks_total", "Attempts this runner ended, by how they ended.", ("mode", "outcome"),
                registry=REGISTRY)
TASK_DURATION = Histogram("helix_runner_task_duration_seconds", "From claim to end of each attempt.",
                          ("mode", "outcome"), buckets=DURATION_BUCKETS, registry=REGISTRY)
TOKENS = Counter("helix_runner_generated_tokens_total", "Output tokens of completed tasks.", registry=REGISTRY)
TOKENS_PER_SECOND = Histogram("helix_runner_tokens_per_second", "Output tokens per second of each completed reply.",
                              buckets=RATE_BUCKETS, registry=REGISTRY)
SLOTS = Gauge("helix_runner_slots", "Tasks this runner can hold at once.", registry=REGISTRY)
SLOTS_IN_USE = Gauge("helix_runner_slots_in_use", "Tasks this runner holds now.", registry=REGISTRY)
ADAPTER_LOADS = Counter("helix_runner_adapter_loads_total", "LoRA adapters loaded onto the base model.",
                        registry=REGISTRY)
ADAPTER_EVICTIONS = Counter("helix_runner_adapter_evictions_total", "LoRA adapters evicted (least recently used).",
                            registry=REGISTRY)
ADAPTER_LOAD_SECONDS = Histogram("helix_runner_adapter_load_seconds", "Time to load one adapter.",
                                 buckets=LOAD_BUCKETS, registry=REGISTRY)
MODEL_LOAD_SECONDS = Gauge("helix_runner_model_load_seconds", "How long setup() took to load the model.",
                           registry=REGISTRY)


def attempt_ended(mode: str, outcome: str, seconds: float, result: dict[str, Any] | None = None) -> None:
    """An attempt ended as `outcome` (complete, fail, release, drop) after `seconds`."""
    TASKS.labels(mode, outcome).inc()
    TASK_DURATION.labels(mode, outcome).observe(max(seconds, 0.0))
    usage = (result or {}).get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if outcome == "complete" and isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
        TOKENS.inc(tokens)
        if seconds > 0:
            TOKENS_PER_SECOND.observe(tokens / seconds)


class GpuCollector:
    """GPU memory used and total per device, read at scrape time through NVML (nvidia-ml-py), when present."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no library, no driver, no GPU: nothing to report
            logger.info("metrics: NVML unavailable; no GPU memory figures")

    def describe(self) -> list[Metric]:
        """Nothing up front: a device may come and go."""
        return []

    def collect(self) -> Iterator[Metric]:
        """helix_runner_gpu_memory_used_bytes and _total_bytes per GPU index."""
        if self._nvml is None:
            return
        used = GaugeMetricFamily("helix_runner_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("helix_runner_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        try:
            for index in range(self._nvml.nvmlDeviceGetCount()):
                info = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(index))
                used.add_metric([str(index)], info.used)
                total.add_metric([str(index)], info.total)
        except Exception:
            logger.warning("metrics: NVML could not be read", exc_info=True)
            return
        yield used
        yield total


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve the metrics at http://host:port/metrics on a daemon thread."""
    REGISTRY.register(GpuCollector())
    start_http_server(port, addr=host, registry=REGISTRY)
    logger.info("metrics on http://%s:%d/metrics", host, port)


class Timer:
    """Seconds since it was made."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        """Seconds so far."""
        return time.monotonic() - self.started
