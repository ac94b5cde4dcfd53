"""A stand-in fine-tuning backend for end-to-end tests: uploads a ready-made adapter as if it had trained it.

It lets the inference side of the adapter story run through the real API (file store, session switch,
the task's adapter ref) without a training run; the adapter directory comes from the test, through
HELIX_TEST_ADAPTER_DIR in the runner's environment.
"""

from __future__ import annotations

import os
from typing import Any

from runner.backends.base import Backend
from runner.errors import BadTaskInput
from runner.messages import Task
from runner.reporter import Report


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
