"""Stand-in text backends for end-to-end tests: adapters uploaded as if trained, and adapter loads counted.

It lets the inference side of the adapter story run through the real API (file store, session switch,
the task's adapter ref) without a training run; the adapter directory comes from the test, through
HELIX_TEST_ADAPTER_DIR in the runner's environment.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from runner.adapters import adapter_key
from runner.backends.base import Backend
from runner.errors import BadTaskInput
from runner.messages import Task
from runner.reporter import Report
from tests.doubles import EchoBackend, pause

logger = logging.getLogger(__name__)


class AdapterUploadBackend(Backend):
    """A `mode=finetune` backend that 'trains' by uploading the adapter directory it was pointed at."""

    def setup(self) -> None:
        """Read where the adapter is (the edge of a test double: its environment)."""
        self.adapter_dir = os.environ["HELIX_TEST_ADAPTER_DIR"]

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """A fine-tuning double answers nothing."""
        raise BadTaskInput(f"task {task.id}: the adapter-upload double only trains")

    def train(self, task: Task, report: Report) -> dict[str, Any]:
        """Report one step, upload the adapter, and name it in the result."""
        report.progress(1, 1, message="training (stand-in)", loss=0.0)
        ref = report.files.upload_dir(self.adapter_dir, kind="adapter", name="adapter.zip")
        return {"text": "trained (stand-in)", "adapter_file_id": ref["id"], "steps": 1, "loss": 0.0}


class WarmAdapters:
    """The stand-in for an AdapterCache: the keys held, least recently used first (what the runner reports)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[str] = []
        self.loads = 0

    @property
    def loaded(self) -> list[str]:
        """Keys of the adapters 'in memory', least recently used first."""
        return list(self.keys)


class ChatAndTuneBackend(EchoBackend):
    """One model for both kinds: predict() echoes (loading the task's adapter first, slowly and counted),
    train() 'trains' a fresh adapter of its own (its checksum differs per task) and uploads it.

    An adapter not held costs `HELIX_TEST_ADAPTER_LOAD_SECONDS` (default 0.3) and a log line
    `adapter <key> loaded`, which the tests count; at most `HELIX_TEST_ADAPTER_CAPACITY` (default 1) are held.
    """

    max_parallel = 1

    def setup(self) -> None:
        """Read the load cost and capacity (the edge of a test double: its environment)."""
        super().setup()
        self.load_seconds = float(os.environ.get("HELIX_TEST_ADAPTER_LOAD_SECONDS", "0.3"))
        self.adapters = WarmAdapters(int(os.environ.get("HELIX_TEST_ADAPTER_CAPACITY", "1")))

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Switch to the task's adapter (loading it if not held), then echo."""
        if task.adapter:
            key, held = adapter_key(task.adapter), self.adapters.keys
            if key in held:
                held.remove(key)
            else:
                pause(self.load_seconds, report)
                self.adapters.loads += 1
                logger.info("task %s: adapter %s loaded (%d loads)", task.id, key[:12], self.adapters.loads)
                del held[: max(0, len(held) + 1 - self.adapters.capacity)]
            held.append(key)
        return super().predict(task, report)

    def train(self, task: Task, report: Report) -> dict[str, Any]:
        """Write an adapter that names the task (so each has its own checksum) and upload it."""
        report.progress(1, 1, message="training (stand-in)", loss=0.0)
        with tempfile.TemporaryDirectory(prefix="helix-e2e-adapter-") as scratch:
            (Path(scratch) / "adapter_config.json").write_text(json.dumps({"task": task.id, "r": 8}))
            (Path(scratch) / "adapter_model.safetensors").write_bytes(b"stand-in %d" % task.id)
            ref = report.files.upload_dir(scratch, kind="adapter", name="adapter.zip")
        return {"text": "trained (stand-in)", "adapter_file_id": ref["id"], "steps": 1, "loss": 0.0,
                "runner_pid": os.getpid()}


class SlowChatAndTuneBackend(ChatAndTuneBackend):
    """ChatAndTuneBackend whose every chat takes `HELIX_TEST_CHAT_SECONDS` (default 2) before it answers, so a
    test can kill the runner while it holds one (chats through /v1 carry no `sleep` param)."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Wait, then load the adapter and echo."""
        pause(float(os.environ.get("HELIX_TEST_CHAT_SECONDS", "2")), report)
        return super().predict(task, report)
