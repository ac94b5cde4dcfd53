"""What the machine under a runner has: each GPU's name and memory (read with NVML), the CPU and its RAM."""

from __future__ import annotations

import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
CPUINFO = Path("/proc/cpuinfo")


class HardwareReader:
    """Reads the hardware on demand; NVML is started once, on the first read, and only where it works.

    `nvml` is the pynvml module (nvidia-ml-py), or a stand-in for it in tests; left out, it is imported
    when first needed. Without the library, a driver or a GPU, the GPU list is empty and the CPU alone
    is reported.
    """

    def __init__(self, nvml: Any = None, *, meminfo: Path | None = None, cpuinfo: Path | None = None) -> None:
        self._nvml = nvml
        self._nvml_ready: bool | None = None  # None: not tried yet
        self._lock = threading.Lock()
        self.meminfo, self.cpuinfo = meminfo or MEMINFO, cpuinfo or CPUINFO

    def read(self) -> dict[str, Any]:
        """`{"gpus": [...], "cpu": {...}}`: the figures a runner reports at start and in each heartbeat."""
        return {"gpus": self.gpus(), "cpu": self.cpu()}

    def gpus(self) -> list[dict[str, Any]]:
        """Each GPU NVML sees: index, name, total and free memory in bytes; [] without NVML."""
        nvml = self._started_nvml()
        if nvml is None:
            return []
        try:
            found = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                found.append({"index": index, "name": name.decode() if isinstance(name, bytes) else str(name),
                              "memory_total": int(memory.total), "memory_free": int(memory.free)})
            return found
        except Exception:  # a GPU fallen off the bus must not stop a heartbeat: report none this time
            logger.warning("NVML could not be read; reporting no GPUs", exc_info=True)
            return []

    def cpu(self) -> dict[str, Any]:
        """The CPU's model and logical core count, and the RAM in all and available, in bytes."""
        total, available = self.ram()
        return {"model": self._cpu_model(), "cores": os.cpu_count() or 1,
                "memory_total": total, "memory_available": available}

    def ram(self) -> tuple[int, int]:
        """(total, available) RAM in bytes: /proc/meminfo, else psutil, else (0, 0)."""
        try:
            fields = {}
            for line in self.meminfo.read_text().splitlines():
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():  # "MemTotal:  16318584 kB"
                    fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
            return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
        except (OSError, KeyError, IndexError):
            pass
        try:
            import psutil
        except ImportError:
            return 0, 0
        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)

    def _cpu_model(self) -> str:
        try:
            for line in self.cpuinfo.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "unknown"

    def _started_nvml(self) -> Any:
        with self._lock:
            if self._nvml_ready is None:
                self._nvml_ready = False
                try:
                    if self._nvml is None:
                        import pynvml

                        self._nvml = pynvml
                    self._nvml.nvmlInit()
                    self._nvml_ready = True
                except Exception:  # no library, no driver, no GPU: the CPU is what there is
                    logger.info("NVML unavailable: reporting the CPU only")
            return self._nvml if self._nvml_ready else None
