"""An axolotl plugin that writes training progress as JSON lines, for the runner to read as they come.

Loaded inside the `python -m axolotl.cli.train` subprocess (the config names it under `plugins:`); the
file it appends to is named by the environment variable HELIX_PROGRESS_FILE, set by the runner that
started the subprocess. One line per logged step: `{"event": "step", "step", "total", "loss", ...}`,
plus `{"event": "begin", "total"}` first and `{"event": "end", "step", "total"}` last. Lines are
flushed one by one, so a reader never waits for a buffer and never sees half a line for long.

When HELIX_PARENT_PID is set, the training also exits as soon as that process (the runner) is gone:
a runner killed outright must not leave an orphaned training holding the GPU.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

PROGRESS_ENV = "HELIX_PROGRESS_FILE"
PARENT_ENV = "HELIX_PARENT_PID"
PLUGIN_NAME = "runner.backends.axolotl_progress.ProgressPlugin"
REWARD_METRICS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
                  "margin": "reward_margin", "accuracy": "reward_accuracy"}


class ProgressCallback(TrainerCallback):
    """Appends one JSON line per logged training step (loss included) to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        """The total is known once the trainer has sized its schedule."""
        if state.is_world_process_zero:
            self._write({"event": "begin", "step": state.global_step, "total": state.max_steps, "time": time.time()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Each logged step (logging_steps: 1) carries the loss of that step."""
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record: dict[str, Any] = {"event": "step", "step": state.global_step, "total": state.max_steps,
                                  "loss": _number(logs["loss"]), "time": time.time()}
        for key in ("learning_rate", "epoch", "grad_norm"):
            if key in logs:
                record[key] = _number(logs[key])
        # What preference trainers report: TRL's DPO as rewards/*, its reward trainer as accuracy and margin.
        for key, name in REWARD_METRICS.items():
            if key in logs:
                record[name] = _number(logs[key])
        self._write(record)

    def on_train_end(self, args, state, control, **kwargs):
        """Training finished (the adapter is saved after this)."""
        if state.is_world_process_zero:
            self._write({"event": "end", "step": state.global_step, "total": state.max_steps, "time": time.time()})


class ProgressPlugin(BasePlugin):
    """Registers ProgressCallback with axolotl's trainer when HELIX_PROGRESS_FILE is set."""

    def register(self, cfg):
        """Called as the config loads, before any weights: start watching the runner from here on."""
        parent = os.environ.get(PARENT_ENV)
        if parent:
            exit_with_parent(int(parent))

    def add_callbacks_pre_trainer(self, cfg, model):
        """The callback goes in before the trainer is built, so it sees on_train_begin."""
        path = os.environ.get(PROGRESS_ENV)
        return [ProgressCallback(path)] if path else []


def exit_with_parent(parent_pid: int, interval: float = 1.0) -> threading.Thread:
    """Exit this process once `parent_pid` is no longer its parent (the parent died and it was reparented)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)  # no cleanup to wait for: the runner that wanted the result is gone

    thread = threading.Thread(target=watch, name="helix-parent-watch", daemon=True)
    thread.start()
    return thread


def _number(value: Any) -> float | None:
    """A JSON-safe float: NaN and infinities (a diverged run) become None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
