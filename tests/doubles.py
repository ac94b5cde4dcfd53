"""Test doubles: backends with no model, just the runner contract (`--backend tests.doubles:EchoBackend`),
and the report and file store a backend is handed, in memory, for backends' unit tests.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from runner.backends.base import Backend
from runner.errors import StopReason, TaskCancelled
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
    """Streams the prompt back word by word; params `sleep` and `token_delay` slow it down.

    Each token comes with a progress event, unless param `token_progress` is 0: then tokens alone,
    as a text model streams them.
    """

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
        with_progress = bool(int(task.params.get("token_progress", 1)))
        words = prompt_of(task).split()
        tokens = [word + " " for word in words[:-1]] + words[-1:]
        for step, token in enumerate(tokens, start=1):
            if step > 1 and delay:
                pause(delay, report)
            report.token(token)
            if with_progress:
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

    def train(self, task: Task, report: Report) -> dict[str, Any]:
        """Stand in for a fine-tune: `params.max_steps` (default 2) progress steps, `params.sleep` apart.

        It uploads no adapter, so the API would refuse its result for a real fine-tune: a double for the
        runner's own tests (tests/e2e/text_doubles.py has one that uploads an adapter).
        """
        steps = int(task.params.get("max_steps", 2))
        for step in range(1, steps + 1):
            pause(float(task.params.get("sleep", 0)), report)
            report.progress(step, steps, message="training", loss=1.0 / step)
        return {"text": f"trained for {steps} steps (echo)", "steps": steps, "loss": 1.0 / max(steps, 1),
                "runner_pid": os.getpid()}


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


class NotABackend:
    """A class with setup() and predict() that does not subclass Backend: the runner refuses it."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def setup(self) -> None:
        """Nothing to load."""

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Answer with a constant."""
        return {"text": "plain"}


# What a backend is handed, for its unit tests.


class FakeFiles:
    """`report.files` on a local directory: uploads are kept by id and fetched back.

    `dirs` maps a ref id to a directory `fetch_dir()` returns as it is (an adapter already unpacked).
    """

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        self.stored: dict[str, dict[str, Any]] = {}  # id -> the ref, plus the stored file's "path"
        self.dirs: dict[Any, Path] = {}
        self._ids = itertools.count(1)

    @property
    def root(self) -> Path:
        """Where stored files live (a fresh temporary directory unless one was given)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="helix-fake-files-"))
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def add(self, path: Path, kind: str = "upload", name: str | None = None,
            content_type: str | None = None) -> dict[str, Any]:
        """Store a copy of a file as the API would; its ref."""
        file_id = f"f{next(self._ids)}"
        name = name or Path(path).name
        target = self.root / f"{file_id}-{name}"
        shutil.copyfile(path, target)
        data = target.read_bytes()
        ref = {"id": file_id, "name": name, "kind": kind, "content_type": content_type, "size": len(data),
               "sha256": hashlib.sha256(data).hexdigest()}
        self.stored[file_id] = {**ref, "path": target}
        return ref

    def upload(self, path: Path, kind: str = "output", name: str | None = None,
               content_type: str | None = None) -> dict[str, Any]:
        """What a backend calls to upload one file."""
        return self.add(path, kind=kind, name=name, content_type=content_type)

    def upload_dir(self, path: Path | str, kind: str = "adapter", name: str = "adapter.zip") -> dict[str, Any]:
        """Zip a directory and upload it."""
        with tempfile.TemporaryDirectory(prefix="helix-fake-zip-") as scratch:
            archive = shutil.make_archive(str(Path(scratch) / "dir"), "zip", path)
            return self.add(Path(archive), kind=kind, name=name, content_type="application/zip")

    def fetch(self, ref: dict[str, Any]) -> Path:
        """The stored file of a ref."""
        return self.stored[ref["id"]]["path"]

    def fetch_dir(self, ref: dict[str, Any]) -> Path:
        """The directory of a ref: one of `dirs`, or a stored zip unpacked."""
        if ref["id"] in self.dirs:
            return self.dirs[ref["id"]]
        target = self.root / "unpacked" / str(ref["id"])
        if not target.exists():
            with zipfile.ZipFile(self.fetch(ref)) as archive:
                archive.extractall(target)
        return target

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Every stored file of one kind, oldest first."""
        return [meta for meta in self.stored.values() if meta["kind"] == kind]


class FakeReport:
    """What a backend reports through, recorded as events; once cancelled, every call raises TaskCancelled.

    It cancels itself after `cancel_after_tokens` tokens or at progress step `cancel_at_step`, if given.
    """

    def __init__(self, files: FakeFiles | None = None, *, cancel_after_tokens: int | None = None,
                 cancel_at_step: int | None = None) -> None:
        self.files = files if files is not None else FakeFiles()
        self.events: list[dict[str, Any]] = []  # as the real Report emits them: with a "kind"
        self.cancel_after_tokens = cancel_after_tokens
        self.cancel_at_step = cancel_at_step
        self._reason: StopReason | None = None
        self._lock = threading.Lock()  # a batching backend streams from its engine thread

    def token(self, text: str) -> None:
        """Record a piece of text."""
        self.check()
        with self._lock:
            self.events.append({"kind": "token", "text": text})
            if self.cancel_after_tokens is not None and len(self.tokens) >= self.cancel_after_tokens:
                self.cancel()

    def progress(self, step: int, total: int, message: str | None = None, **extra: Any) -> None:
        """Record a step."""
        self.check()
        event: dict[str, Any] = {**extra, "kind": "progress", "step": step, "total": total}
        if message is not None:
            event["message"] = message
        with self._lock:
            self.events.append(event)
        if self.cancel_at_step is not None and step >= self.cancel_at_step:
            self.cancel()

    def log(self, message: str, level: str = "info") -> None:
        """Record a log line."""
        self.check()
        with self._lock:
            self.events.append({"kind": "log", "level": level, "message": message})

    def check(self) -> None:
        """Raise TaskCancelled once cancelled."""
        if self._reason is not None:
            raise TaskCancelled(self._reason)

    def cancel(self, reason: StopReason = StopReason.CANCELLED) -> None:
        """Tell the backend to stop; the first reason given wins."""
        self._reason = self._reason or reason

    @property
    def cancelled(self) -> bool:
        """True once cancelled."""
        return self._reason is not None

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the task must stop, or None."""
        return self._reason

    @property
    def tokens(self) -> list[str]:
        """The texts of the token events, in order."""
        return [e["text"] for e in self.events if e["kind"] == "token"]

    @property
    def logs(self) -> list[str]:
        """The messages of the log events, in order."""
        return [e["message"] for e in self.events if e["kind"] == "log"]

    @property
    def progress_events(self) -> list[dict[str, Any]]:
        """The progress events, in order, without their "kind"."""
        return [{k: v for k, v in e.items() if k != "kind"} for e in self.events if e["kind"] == "progress"]
