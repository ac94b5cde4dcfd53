"""What a runner tells the API it is: its hardware, backend, the kinds it serves, its slots, adapters, version.

Sent once at start (`POST /api/v1/worker/runners`) and in the body of every heartbeat, so the API's
picture stays current without a request of its own.
"""

from __future__ import annotations

from typing import Any

from runner import __version__
from runner.config import RunnerConfig
from runner.hardware import HardwareReader


def loaded_adapters(backend: Any) -> list[str]:
    """The keys (checksums) of the adapters the backend holds in memory, least recently used first."""
    cache = getattr(backend, "adapters", None)
    loaded = getattr(cache, "loaded", None)
    return [str(key) for key in loaded] if isinstance(loaded, list) else []


def describe(config: RunnerConfig, backend: Any, *, slots: int, busy: int, hardware: HardwareReader) -> dict[str, Any]:
    """The report, as the API's `RunnerReport` schema reads it."""
    return {
        "hardware": hardware.read(),
        "backend": config.backend or type(backend).__name__,
        "kinds": [kind.as_json() for kind in config.kinds],
        "slots": {"total": slots, "busy": max(0, min(busy, slots))},
        "adapters": loaded_adapters(backend),
        "version": __version__,
    }
