"""Files of a leased task: what its runner reads (training data, the adapter) and what it uploads.

Every read and write first checks the runner's lease, so a runner that lost its task can neither
read the task's files nor add to its reply.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from helix_api.sessions import files
from helix_api.sessions.storage import FileStore, safe_name
from helix_api.tasks.scheduler import Scheduler


def open_for_runner(scheduler: Scheduler, store: FileStore, task_id: int, token: str,
                    file_id: int) -> tuple[Any, BinaryIO]:
    """A file the task may read (one of its session's, or its adapter) and its bytes, open for reading."""
    task = scheduler.leased(task_id, token)
    with scheduler.database.orm_read() as db:
        row = files.for_task(db, task, file_id)
    return row, store.open(row.path)


def save_from_runner(scheduler: Scheduler, store: FileStore, task_id: int, token: str, *, kind: files.FileKind,
                     filename: str, source: BinaryIO, content_type: str, max_bytes: int) -> Any:
    """Store a file the task made for its reply (an output image, or a fine-tune's adapter); its row."""
    task = scheduler.leased(task_id, token)  # refuse a stale runner before taking its bytes
    name = safe_name(filename or "file")
    blob = store.save(source, f"sessions/{task.session_id}", name, max_bytes)
    try:
        return scheduler.add_file(task_id, token, kind=kind, name=name, blob=blob, content_type=content_type)
    except BaseException:
        store.delete(blob.key)  # the lease was lost meanwhile: keep no bytes without a row
        raise
