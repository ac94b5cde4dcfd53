"""The processes the benchmark starts and watches: stopping them by pid, and the RSS/CPU of a process tree."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger(__name__)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM a process we started (its own process group), SIGKILL the group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning("pid %s ignored SIGTERM for %.0fs; killing its process group", proc.pid, timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class TreeMemory:
    """Samples the RSS of a process and its descendants in the background; keeps the peaks."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.every = every
        self.peak_sum = 0
        self.peak_worker = 0
        self.peak_master = 0
        self.peak_pss = 0
        self.processes = 0
        self.phases: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _tree(self) -> list[Any]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return []

    def sample(self, full: bool = False) -> dict[str, float]:
        """One sample: RSS sum, largest child's RSS, and (with `full`) the PSS sum."""
        total = worker = pss = 0
        tree = self._tree()
        for proc in tree:
            try:
                if full:
                    info = proc.memory_full_info()
                    pss += getattr(info, "pss", info.rss)
                else:
                    info = proc.memory_info()
            except self._psutil.Error:
                continue
            total += info.rss
            if proc.pid != self.root.pid:
                worker = max(worker, info.rss)
            else:
                self.peak_master = max(self.peak_master, info.rss)
        self.peak_sum = max(self.peak_sum, total)
        self.peak_worker = max(self.peak_worker, worker)
        self.peak_pss = max(self.peak_pss, pss)
        self.processes = max(self.processes, len(tree))
        return {"rss_sum_mb": total / 2**20, "worker_rss_mb": worker / 2**20, "pss_sum_mb": pss / 2**20}

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the live processes of the tree."""
        total = 0.0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
            except self._psutil.Error:
                continue
            total += times.user + times.system
        return total

    def phase_end(self, label: str) -> None:
        """Record a full sample at the end of a phase."""
        self.phases[label] = {k: round(v, 1) for k, v in self.sample(full=True).items()}
        logger.info("  memory after %s: %s", label, self.phases[label])

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the peaks in MB."""
        self._stop.set()
        self._thread.join(timeout=2)
        return {"rss_sum_mb": self.peak_sum / 2**20, "worker_rss_mb": self.peak_worker / 2**20,
                "master_rss_mb": self.peak_master / 2**20,
                "pss_sum_mb": self.peak_pss / 2**20, "processes": self.processes, "phases": self.phases}
