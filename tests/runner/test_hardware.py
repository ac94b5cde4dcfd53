"""runner.hardware: GPUs through NVML (a stand-in for pynvml here: there is no GPU), else the CPU and its RAM."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runner.hardware import HardwareReader

GIB = 1024**3


class FakeNvml:
    """The part of pynvml the reader calls, over a list of (name, total, free)."""

    def __init__(self, gpus: list[tuple[Any, int, int]], *, init_error: Exception | None = None) -> None:
        self.gpus, self.init_error, self.inits = gpus, init_error, 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self.gpus[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        _, total, free = self.gpus[handle]
        return SimpleNamespace(total=total, free=free, used=total - free)


def test_each_gpu_is_read_with_nvml_once_started():
    nvml = FakeNvml([("NVIDIA H100 80GB HBM3", 80 * GIB, 70 * GIB), (b"NVIDIA A10G", 24 * GIB, 1 * GIB)])
    reader = HardwareReader(nvml)
    assert reader.gpus() == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * GIB, "memory_free": 70 * GIB},
        {"index": 1, "name": "NVIDIA A10G", "memory_total": 24 * GIB, "memory_free": 1 * GIB},  # older pynvml: bytes
    ]
    nvml.gpus[0] = ("NVIDIA H100 80GB HBM3", 80 * GIB, 10 * GIB)
    assert reader.read()["gpus"][0]["memory_free"] == 10 * GIB  # free memory is read anew each time
    assert nvml.inits == 1


def test_without_nvml_the_gpu_list_is_empty_and_not_retried():
    nvml = FakeNvml([("x", 1, 1)], init_error=RuntimeError("NVML Shared Library Not Found"))
    reader = HardwareReader(nvml)
    assert reader.gpus() == [] and reader.gpus() == []
    assert nvml.inits == 1


def test_a_gpu_that_cannot_be_read_reports_none_this_time():
    class Broken(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
            raise RuntimeError("GPU is lost")

    assert HardwareReader(Broken([("x", 1, 1)])).gpus() == []


def test_the_real_pynvml_imports_and_reports_no_gpu_here():
    reader = HardwareReader()  # the installed nvidia-ml-py: nvmlInit fails without a driver
    assert reader.gpus() == []


def test_the_cpu_is_read_from_proc(tmp_path: Path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16318584 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9454 48-Core Processor\n")
    cpu = HardwareReader(FakeNvml([]), meminfo=meminfo, cpuinfo=cpuinfo).cpu()
    assert cpu == {"model": "AMD EPYC 9454 48-Core Processor", "cores": os.cpu_count(),
                   "memory_total": 16318584 * 1024, "memory_available": 12000000 * 1024}


def test_this_machines_cpu_and_ram_are_read():
    cpu = HardwareReader(FakeNvml([])).cpu()
    assert cpu["cores"] == os.cpu_count() and cpu["model"]
    assert 0 < cpu["memory_available"] <= cpu["memory_total"]


def test_without_proc_ram_comes_from_psutil(tmp_path: Path):
    import psutil

    total, available = HardwareReader(meminfo=tmp_path / "absent").ram()
    assert total == psutil.virtual_memory().total and 0 < available <= total
