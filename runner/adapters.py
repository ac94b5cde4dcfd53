"""Fine-tuned LoRA adapters applied to an already-loaded base model with peft, the recently used kept in memory.

The base weights are loaded once; each adapter adds its small matrices beside them under its own name.
Before a batch runs, `activate(key)` switches to that adapter, or, for a task without one, turns every
adapter layer off: a session without an adapter never answers with one left over from another session.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from runner import metrics
from runner.errors import BadTaskInput

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 4  # adapters kept loaded; the least recently used goes first


def adapter_key(ref: dict[str, Any]) -> str:
    """A stable key for an adapter file ref: its checksum (or its id, lacking one)."""
    return str(ref.get("sha256") or ref.get("id"))


class AdapterCache:
    """LoRA adapters on one base model, at most `capacity` of them loaded at a time."""

    def __init__(self, model: Any, capacity: int = DEFAULT_CAPACITY) -> None:
        self.model = model  # the base model; peft injects adapter layers into it in place
        self.capacity = max(1, capacity)
        self.peft_model: Any = None
        self._loaded: OrderedDict[str, str] = OrderedDict()  # key -> peft adapter name, oldest first
        self._lock = threading.Lock()
        self.loads = 0  # adapters read from disk, for tests and logs

    def __contains__(self, key: str) -> bool:
        return key in self._loaded

    @property
    def loaded(self) -> list[str]:
        """Keys of the adapters in memory, least recently used first."""
        return list(self._loaded)

    def activate(self, key: str | None, path: str | None = None) -> None:
        """Make the next forward passes use adapter `key` (loaded from `path` if not in memory), or none."""
        with self._lock:
            if key is None:
                if self.peft_model is not None:
                    self.peft_model.base_model.disable_adapter_layers()
                return
            if key not in self._loaded:
                if path is None:
                    raise KeyError(f"adapter {key} is not loaded and no path was given")
                self._load(key, path)
            self._loaded.move_to_end(key)
            self.peft_model.base_model.enable_adapter_layers()
            self.peft_model.set_adapter(self._loaded[key])

    def _load(self, key: str, path: str) -> None:
        from peft import PeftModel

        started = time.monotonic()
        name = f"adapter_{hashlib.sha256(key.encode()).hexdigest()[:16]}"  # a valid module name, unique per key
        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
            else:
                self.peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
        except ValueError as exc:  # peft: no adapter_config.json, or modules this model does not have
            raise BadTaskInput(f"adapter {key[:12]}: cannot be loaded onto this model: {exc}") from exc
        self.peft_model.eval()
        self._loaded[key] = name
        self.loads += 1
        metrics.ADAPTER_LOADS.inc()
        metrics.ADAPTER_LOAD_SECONDS.observe(time.monotonic() - started)
        logger.info("adapter %s loaded from %s (%d in memory)", key[:12], path, len(self._loaded))
        while len(self._loaded) > self.capacity:
            old_key, old_name = self._loaded.popitem(last=False)
            self.peft_model.delete_adapter(old_name)
            metrics.ADAPTER_EVICTIONS.inc()
            logger.info("adapter %s evicted (least recently used)", old_key[:12])
