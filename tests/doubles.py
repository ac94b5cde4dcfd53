"""Test-double backends: no model, just the runner contract (`--backend tests.doubles:EchoBackend`)."""

from __future__ import annotations

import os
import time
from typing import Any

from runner.backends.base import Backend
from runner.messages import Task
from runner.reporter import Report

SLICE = 0.01  # sleeps are cut this fine so a cancelled task stops promptly


def prompt_of(task: Task) -> str:
    """The last user message of a chat task, or its `prompt`."""
    messages = task.input.get("messages") or []
    if messages:
        return str(messages[-1].get("content", ""))
    return str(task.input.get("prompt", ""))


def pause(seconds: float, report: Report) -> None:
    """Sleep in small slices, stopping as soon as the task must stop."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        report.check()
        time.sleep(min(SLICE, left))
    report.check()


class EchoBackend(Backend):
    """Streams the prompt back word by word; params `sleep` and `token_delay` slow it down."""

    max_parallel = 64  # no model to share: as many at once as the runner holds
    setup_calls = 0  # across instances, so a test can see setup() ran once per process

    def setup(self) -> None:
        """Count the call; there are no weights to load."""
        type(self).setup_calls += 1
        self.ready = True

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Echo the prompt as tokens, with a progress event per token."""
        if not getattr(self, "ready", False):
            raise RuntimeError("predict() called before setup()")
        pause(float(task.params.get("sleep", 0)), report)
        delay = float(task.params.get("token_delay", 0))
        words = prompt_of(task).split()
        tokens = [word + " " for word in words[:-1]] + words[-1:]
        for step, token in enumerate(tokens, start=1):
            if step > 1 and delay:
                pause(delay, report)
            report.token(token)
            report.progress(step, len(tokens))
        text = "".join(tokens)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in task.input.get("messages") or [])
        prompt_tokens = prompt_tokens or len(words)
        return {
            "text": text,
            "files": [],
            "finish_reason": "stop",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)},
            # Lets end-to-end tests see which process ran a task and that setup() ran once there.
            "setup_calls": type(self).setup_calls,
            "runner_pid": os.getpid(),
        }


class CrashBackend(Backend):
    """Every task fails."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Raise."""
        raise RuntimeError("boom: backend crashed")


class CrashOnceBackend(EchoBackend):
    """The first attempt of every task fails; later attempts echo (for retry tests)."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Raise on attempt 1, else echo."""
        if task.attempt <= 1:
            raise RuntimeError(f"boom: attempt {task.attempt} crashed")
        return super().predict(task, report)


class StubbornBackend(Backend):
    """Sleeps `params.sleep` seconds without ever looking at the report, then answers."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Ignore cancellation while sleeping, like a model stuck in one long step."""
        time.sleep(float(task.params.get("sleep", 0)))
        return {"text": "done"}


class PlainBackend:
    """A backend that subclasses nothing: the contract is duck-typed (a config in, setup() and predict())."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def setup(self) -> None:
        """Nothing to load."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Answer with a constant."""
        return {"text": "plain"}
