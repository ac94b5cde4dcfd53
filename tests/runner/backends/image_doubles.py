"""A fake report and file store for the image backend's unit tests: what the runner hands predict(), in memory."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from runner.errors import StopReason, TaskCancelled
from runner.messages import Task

IMAGE_MODEL = "tiny-sdxl"


class FakeFiles:
    """`report.files` on a local directory: uploads are kept, fetches read them back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.stored: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def add(self, path: Path, kind: str = "upload", name: str | None = None,
            content_type: str | None = None) -> dict[str, Any]:
        """Store a file as the API would; its ref."""
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

    def upload_dir(self, path: Path, kind: str = "adapter", name: str = "adapter.zip") -> dict[str, Any]:
        """Zip a directory and upload it."""
        archive = shutil.make_archive(str(self.root / f"zip-{next(self._ids)}"), "zip", path)
        return self.add(Path(archive), kind=kind, name=name, content_type="application/zip")

    def fetch(self, ref: dict[str, Any]) -> Path:
        """The stored file of a ref."""
        return self.stored[ref["id"]]["path"]

    def fetch_dir(self, ref: dict[str, Any]) -> Path:
        """Unzip a stored directory."""
        target = self.root / "unpacked" / ref["id"]
        if not target.exists():
            with zipfile.ZipFile(self.fetch(ref)) as archive:
                archive.extractall(target)
        return target

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Every stored file of one kind, oldest first."""
        return [meta for meta in self.stored.values() if meta["kind"] == kind]


class FakeReport:
    """Records events; once `cancel()` is called (or `cancel_at_step` is reached) every call raises."""

    def __init__(self, files: FakeFiles, cancel_at_step: int | None = None) -> None:
        self.files = files
        self.events: list[dict[str, Any]] = []
        self.cancel_at_step = cancel_at_step
        self._reason: StopReason | None = None

    def progress(self, step: int, total: int, message: str | None = None, **extra: Any) -> None:
        self.check()
        self.events.append({**extra, "kind": "progress", "step": step, "total": total, "message": message})
        if self.cancel_at_step is not None and step >= self.cancel_at_step:
            self.cancel()

    def token(self, text: str) -> None:
        self.check()
        self.events.append({"kind": "token", "text": text})

    def log(self, message: str, level: str = "info") -> None:
        self.check()
        self.events.append({"kind": "log", "level": level, "message": message})

    def check(self) -> None:
        if self._reason is not None:
            raise TaskCancelled(self._reason)

    def cancel(self, reason: StopReason = StopReason.CANCELLED) -> None:
        self._reason = reason

    @property
    def cancelled(self) -> bool:
        return self._reason is not None

    def progress_events(self) -> list[dict[str, Any]]:
        """The progress events, in order."""
        return [e for e in self.events if e["kind"] == "progress"]


def image_task(task_id: int = 1, prompt: str = "a red fox in the snow", adapter: dict[str, Any] | None = None,
               **params: Any) -> Task:
    """A create/image task as a runner claims it."""
    return Task(id=task_id, session_id=1, interaction_id=2, mode="create", type="image", model_name=IMAGE_MODEL,
                attempt=1, input={"prompt": prompt, "messages": [{"role": "user", "content": prompt}]},
                params=params, adapter=adapter)


def finetune_task(files: list[dict[str, Any]], captions: dict[str, str], task_id: int = 9, **params: Any) -> Task:
    """A finetune/image task as a runner claims it."""
    return Task(id=task_id, session_id=1, interaction_id=2, mode="finetune", type="image", model_name=IMAGE_MODEL,
                attempt=1, input={"files": files, "captions": captions}, params=params)


def tiny_config(model: Path | str, **overrides) -> SimpleNamespace:
    """The RunnerConfig fields the SDXL backend reads."""
    fields = {"model_name": str(model), "device": "cpu", "dtype": "auto", "gpu_memory": {}, "cpu_memory": None,
              "quantize": None, "cache_dir": None, "work_dir": None}
    return SimpleNamespace(**{**fields, **overrides})
