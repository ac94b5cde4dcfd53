"""A task's files: inputs fetched once into a cache by checksum, outputs and adapters uploaded.

Runners share no disk with the API or each other: everything goes through the worker API with the
task's lease token, and a file is cached under its SHA-256 so a runner fetches each adapter once.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError

if TYPE_CHECKING:
    from runner.client import ApiClient

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".helix-complete"


class FileCorrupt(RunnerError):
    """A fetched file does not match the checksum the API stored for it."""


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A file name with no directory part, usable on any disk."""
    base = PurePosixPath(name.replace("\\", "/")).name.strip().lstrip(".")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "file"


def zip_dir(source: Path, dest: Path) -> Path:
    """Zip a directory's files (not the directory itself) into `dest`."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(source).as_posix())
    return dest


def unzip_safely(archive_path: Path, dest: Path) -> None:
    """Extract a zip into `dest`, refusing members that would land outside it."""
    root = dest.resolve()
    with zipfile.ZipFile(archive_path) as archive:
        for member in archive.infolist():
            target = (root / member.filename).resolve()
            if not target.is_relative_to(root):
                raise FileCorrupt(f"{archive_path.name}: member {member.filename!r} points outside the archive")
        archive.extractall(root)


class TaskFiles:
    """Fetch and upload the files of one task under its lease (`report.files` in a backend)."""

    def __init__(self, client: ApiClient, task_id: int, lease_token: str, cache_dir: Path) -> None:
        self.client = client
        self.task_id = task_id
        self.lease_token = lease_token
        self.cache_dir = Path(cache_dir)

    def fetch(self, ref: dict[str, Any]) -> Path:
        """A local copy of a file ref (`{id, name, sha256, ...}`), downloaded unless cached."""
        sha = str(ref.get("sha256") or "")
        name = safe_name(str(ref.get("name") or f"file-{ref['id']}"))
        folder = self.cache_dir / "files" / (sha or f"id-{ref['id']}")
        target = folder / name
        if sha and target.exists() and sha256_of(target) == sha:
            return target
        folder.mkdir(parents=True, exist_ok=True)
        # Written beside the target, then renamed: a runner killed mid-download leaves no half file.
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".part-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            stored = self.client.download(self.task_id, self.lease_token, int(ref["id"]), tmp)
            actual = sha256_of(tmp)
            expected = sha or stored
            if expected and actual != expected:
                raise FileCorrupt(f"file {ref['id']} ({name}): checksum {actual[:12]} is not {expected[:12]}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("task %s: fetched file %s (%s, %d bytes)", self.task_id, ref["id"], name, target.stat().st_size)
        return target

    def fetch_dir(self, ref: dict[str, Any]) -> Path:
        """A zipped directory (an adapter) fetched and unpacked once per checksum."""
        archive = self.fetch(ref)
        key = str(ref.get("sha256") or sha256_of(archive))
        dest = self.cache_dir / "unpacked" / key
        if (dest / COMPLETE_MARKER).exists():
            return dest
        staging = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".unpack-"))
        try:
            unzip_safely(archive, staging)
            (staging / COMPLETE_MARKER).touch()
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(dest)
            except OSError:
                if not (dest / COMPLETE_MARKER).exists():  # not another thread that got there first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def upload(self, path: Path | str, kind: str = "output", name: str | None = None,
               content_type: str | None = None) -> dict[str, Any]:
        """Store a file this task produced; returns its ref (with `id`) for the result."""
        source = Path(path)
        name = name or source.name
        content_type = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        ref = self.client.upload(self.task_id, self.lease_token, source, kind=kind, name=name,
                                 content_type=content_type)
        logger.info("task %s: uploaded %s %s as file %s (%d bytes)", self.task_id, kind, name, ref.get("id"),
                    source.stat().st_size)
        return ref

    def upload_dir(self, path: Path | str, kind: str = "adapter", name: str = "adapter.zip") -> dict[str, Any]:
        """Zip a directory (a PEFT adapter) and store it as one file."""
        with tempfile.TemporaryDirectory(prefix="helix-upload-") as scratch:
            archive = zip_dir(Path(path), Path(scratch) / safe_name(name))
            return self.upload(archive, kind=kind, name=name, content_type="application/zip")
