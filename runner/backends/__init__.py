"""Backends by name, imported only when asked for so the runner core needs no model libraries."""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from runner.backends.base import Backend
from runner.errors import BackendNotFound

if TYPE_CHECKING:
    from runner.config import RunnerConfig

__all__ = ["BACKENDS", "Backend", "load_backend"]

# name -> "package.module:Class"; imported on demand, so the Mistral image never imports diffusers.
BACKENDS: dict[str, str] = {
    "mistral": "runner.backends.mistral:MistralBackend",
    "sdxl": "runner.backends.sdxl:SDXLBackend",
    "reward": "runner.backends.reward:RewardBackend",  # --mode score: a reward model scores replies
}


def resolve_backend(name_or_path: str) -> type[Backend]:
    """The backend class for a registered name or a `package.module:Class` import path."""
    path = BACKENDS.get(name_or_path, name_or_path)
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        known = ", ".join(sorted(BACKENDS)) or "none yet"
        raise BackendNotFound(
            f"unknown backend {name_or_path!r}: give a registered name ({known}) "
            "or an import path such as package.module:Class"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A missing dependency of the backend (torch, say) is its own error, not a wrong name.
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise
        raise BackendNotFound(f"backend {name_or_path!r}: no module named {module_name!r}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise BackendNotFound(f"backend {name_or_path!r}: {module_name!r} has no {attr!r}") from exc
    # A subclass, so every backend has what the runner relies on: train() and max_parallel with defaults.
    if not inspect.isclass(target) or not issubclass(target, Backend):
        raise BackendNotFound(f"backend {name_or_path!r}: {path} is not a subclass of runner.backends.Backend")
    return target


def load_backend(name_or_path: str, config: RunnerConfig) -> Backend:
    """Import a backend class and construct it with the runner's config, as every backend is."""
    return resolve_backend(name_or_path)(config)
