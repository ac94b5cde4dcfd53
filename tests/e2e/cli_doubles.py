"""Stand-in backends for the user CLI's end-to-end tests: a PNG maker and a trainer that reports steps."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from runner.backends.base import Backend
from runner.messages import Task
from runner.reporter import Report


class PngBackend(Backend):
    """Images: one progress event per step, then a small red PNG. Fine-tunes: steps with a falling loss."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Denoise in `num_inference_steps` steps (default 3) and upload a PNG."""
        steps = int(task.params.get("num_inference_steps", 3))
        for step in range(1, steps + 1):
            report.progress(step, steps, message="denoising")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "0.png"
            Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
            ref = report.files.upload(path, kind="output", name="0.png", content_type="image/png")
        return {"files": [ref["id"]], "text": ""}

    def train(self, task: Task, report: Report) -> dict[str, Any]:
        """Report `max_steps` (default 3) steps with a loss, then upload an adapter directory."""
        steps = int(task.params.get("max_steps", 3))
        for step in range(1, steps + 1):
            report.progress(step, steps, message="training", loss=1.0 / step)
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "adapter_config.json").write_text(json.dumps({"r": 8}))
            ref = report.files.upload_dir(scratch, kind="adapter", name="adapter.zip")
        return {"text": f"trained for {steps} steps", "adapter_file_id": ref["id"], "steps": steps,
                "loss": 1.0 / steps}


class SlowEchoBackend(Backend):
    """Chats: the prompt streamed back a word every 0.2 s, so a test can type while a reply streams."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Echo the last message word by word, slowly."""
        words = str(task.input["messages"][-1]["content"]).split()
        for index, word in enumerate(words):
            if index:
                time.sleep(0.2)
            report.token(word if index == len(words) - 1 else word + " ")
        text = " ".join(words)
        return {"text": text, "finish_reason": "stop",
                "usage": {"prompt_tokens": len(words), "completion_tokens": len(words),
                          "total_tokens": 2 * len(words)}}
