"""Where file bytes live: a small interface, and a local directory behind it (S3 can be added later).

The database keeps what a file is (owner, session, name, size, checksum); the store keeps its bytes
under an opaque key that no user-given name can steer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from helix_api.errors import TooLarge, echo

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "file") -> str:
    """A file name with no directory part or odd characters: `../../etc/passwd` -> `passwd`."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = _UNSAFE.sub("_", base).strip("._") or default
    return base[:200]


@dataclass(frozen=True)
class StoredBlob:
    """What the store wrote: its key, size and SHA-256."""

    key: str
    size: int
    sha256: str


class FileStore(ABC):
    """Bytes by key."""

    @abstractmethod
    def save(self, source: BinaryIO, prefix: str, name: str, max_bytes: int) -> StoredBlob:
        """Copy `source` in under a new key; TooLarge (and nothing kept) beyond `max_bytes`."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """The bytes of `key`, for reading."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Forget `key`; no error if it is already gone."""


class LocalFileStore(FileStore):
    """Files in a local directory (by default `$HELIX_DATA_DIR/files`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"key {key!r} is outside the store")
        return path

    def save(self, source: BinaryIO, prefix: str, name: str, max_bytes: int) -> StoredBlob:
        key = f"{prefix}/{uuid.uuid4().hex}-{safe_name(name)}"
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        # Written to a temporary name and renamed, so a crash never leaves a half file under a real key.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"File {echo(name)} is over the limit of {max_bytes} bytes.", field="file")
                    digest.update(chunk)
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredBlob(key=key, size=size, sha256=digest.hexdigest())

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError:
            logger.exception("could not delete stored file %s", key)
