"""Worker API: how runners inside model containers claim tasks, report, and finish them.

Only this blueprint speaks the runners' wire format, so a task's shape on the wire (`task_payload`)
is defined here too.
"""

from __future__ import annotations

import functools
import select
import socket
from typing import Any

from flask import Blueprint, Response, g, request

from . import files, responses, runners, task_files
from .auth import require_runner
from .errors import InvalidField
from .queues import QueueFilter
from .services import services
from .validation import field, json_body, parse_mode, parse_type, query_number

bp = Blueprint("worker", __name__, url_prefix="/api/v1/worker")

MAX_EVENTS_PER_POST = 1000
MAX_POSTS_PER_REQUEST = 256
_RUNNER_KINDS = ("token", "progress", "log")


def _lease_token(body: dict[str, Any]) -> str:
    return field(body, "lease_token", str)


def _runner_name() -> str:
    """The runner's own name (a host may run several under one token), else its token's name."""
    return (request.headers.get("X-Helix-Runner") or g.caller.name)[:200]


@bp.get("/task")
@require_runner
def claim():
    """Claim the next matching task (200 with a lease) or say there is none (204)."""
    svc = services()
    mode = parse_mode(request.args.get("mode", "create"))
    type_ = parse_type(request.args.get("type", "text"))
    model_name = request.args.get("model_name")
    if not model_name:
        raise InvalidField("Query parameter 'model_name' is required.", field="model_name")
    wait = query_number("wait", 0.0, 0.0, svc.settings["MAX_WAIT_SECONDS"])
    runner = _runner_name()
    runners.seen(svc.database, runner, runner_token_id=g.caller.id, mode=mode, type_=type_, model_name=model_name)
    sock = request.environ.get("gunicorn.socket")  # absent under test clients: nobody can hang up there
    claimed = svc.scheduler.claim_waiting(
        QueueFilter(mode, type_, model_name), wait=wait,
        client_gone=functools.partial(hung_up, sock) if wait and sock is not None else None,
        runner=runner, runner_token_id=g.caller.id)
    if claimed is None:
        return Response(status=204)
    task, lease = claimed
    return {"task": task_payload(task), "lease": lease.to_json()}


def task_payload(task: Any) -> dict[str, Any]:
    """A task as the worker API hands it to a runner."""
    return {"id": task.id, "session_id": task.session_id, "interaction_id": task.interaction_id,
            "mode": task.mode.value, "type": task.type.value, "model_name": task.model_name,
            "attempt": task.attempt, "input": task.input, "params": task.params,
            "adapter": task.input.get("adapter"), "files": task.input.get("files", [])}


def hung_up(sock: socket.socket) -> bool:
    """True once the client closed its end: a waiting runner sends nothing, so readable means EOF."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # closed or reset under us
        return True


@bp.post("/task/<int:task_id>/heartbeat")
@require_runner
def heartbeat(task_id: int):
    """Renew the lease; tells the runner if the task was cancelled."""
    body = json_body({"lease_token"})
    svc = services()
    runners.touched(svc.database, _runner_name())
    expires = svc.scheduler.heartbeat(task_id, _lease_token(body))
    return {"cancelled": expires is None, "lease_expires_at": expires.isoformat() if expires else None}


def _event(raw: Any, index: int) -> dict[str, Any]:
    where = f"events[{index}]"
    if not isinstance(raw, dict):
        raise InvalidField(f"{where} must be an object.", field="events")
    seq, kind = raw.get("seq"), raw.get("kind")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InvalidField(f"{where}.seq must be a positive integer.", field="events")
    if kind not in _RUNNER_KINDS:
        raise InvalidField(f"{where}.kind must be one of {', '.join(_RUNNER_KINDS)}, not {kind!r}.",
                           field="events")
    if kind == "token" and not isinstance(raw.get("text"), str):
        raise InvalidField(f"{where}.text must be a string for a token event.", field="events")
    if kind == "progress":
        for key in ("step", "total"):
            value = raw.get(key)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise InvalidField(f"{where}.{key} must be a number.", field="events")
    if kind == "log" and not isinstance(raw.get("message"), str):
        raise InvalidField(f"{where}.message must be a string for a log event.", field="events")
    return raw


@bp.post("/task/<int:task_id>/events")
@require_runner
def post_events(task_id: int):
    """Store tokens, progress and log lines, each once by its seq."""
    body = json_body({"lease_token", "events"})
    return services().scheduler.add_events(task_id, _lease_token(body), _events(body, required=True))


@bp.post("/events")
@require_runner
def post_events_many():
    """Events of several tasks a runner holds, in one request: each task's answer says how it went."""
    body = json_body({"posts"})
    raw_posts = field(body, "posts", list)
    if len(raw_posts) > MAX_POSTS_PER_REQUEST:
        raise InvalidField(f"At most {MAX_POSTS_PER_REQUEST} posts per request.", field="posts")
    posts = []
    for index, raw in enumerate(raw_posts):
        if not isinstance(raw, dict) or set(raw) != {"task_id", "lease_token", "events"}:
            raise InvalidField(f"posts[{index}] must be an object of task_id, lease_token and events.",
                               field="posts")
        task_id = field(raw, "task_id", int)
        posts.append((task_id, field(raw, "lease_token", str), _events(raw, required=True)))
    return {"results": services().scheduler.add_events_many(posts)}


def _events(body: dict[str, Any], *, required: bool) -> list[dict[str, Any]]:
    items = field(body, "events", list, required=required, default=[])
    if len(items) > MAX_EVENTS_PER_POST:
        raise InvalidField(f"At most {MAX_EVENTS_PER_POST} events per post.", field="events")
    return [_event(raw, i) for i, raw in enumerate(items)]


@bp.post("/task/<int:task_id>/complete")
@require_runner
def complete(task_id: int):
    """Store the result, and the events the runner had not posted yet."""
    body = json_body({"lease_token", "result", "events"})
    result = field(body, "result", dict)
    services().scheduler.complete(task_id, _lease_token(body), result, _events(body, required=False))
    return {"status": "complete"}


@bp.get("/task/<int:task_id>/files/<int:file_id>")
@require_runner
def download_file(task_id: int, file_id: int):
    """A file of the task's session (its training data), or the adapter it runs with."""
    token = request.headers.get("X-Helix-Lease", "")
    if not token:
        raise InvalidField("Send the task's lease token in the X-Helix-Lease header.", field="X-Helix-Lease")
    svc = services()
    row, handle = task_files.open_for_runner(svc.scheduler, svc.store, task_id, token, file_id)
    response = responses.stored_file(row, handle, attachment=True)
    response.headers["X-Helix-SHA256"] = row.sha256
    return response


@bp.post("/task/<int:task_id>/files")
@require_runner
def upload_file(task_id: int):
    """Store a file the task made for its reply: an output image, or a fine-tune's adapter."""
    svc = services()
    max_bytes = svc.settings["MAX_FILE_BYTES"]
    request.max_content_length = max_bytes + 1024 * 1024  # the form around the file
    allowed = {"lease_token", "kind"}
    unknown = sorted(set(request.form) - allowed) + sorted(set(request.files) - {"file"})
    if unknown:
        raise InvalidField(f"Unknown form field {unknown[0]!r}; send lease_token, kind and file.", field=unknown[0])
    token = request.form.get("lease_token", "")
    if not token:
        raise InvalidField("Form field 'lease_token' is required.", field="lease_token")
    try:
        kind = files.FileKind(request.form.get("kind", ""))
    except ValueError:
        kind = None
    if kind not in files.RUNNER_KINDS:
        raise InvalidField("Form field 'kind' must be output or adapter.", field="kind")
    upload = request.files.get("file")
    if upload is None:
        raise InvalidField("Form field 'file' (the file) is required.", field="file")
    row = task_files.save_from_runner(svc.scheduler, svc.store, task_id, token, kind=kind,
                                      filename=upload.filename or "file", source=upload.stream,
                                      content_type=upload.mimetype or "application/octet-stream",
                                      max_bytes=max_bytes)
    return {"file": files.file_ref(row)}, 201


@bp.post("/task/<int:task_id>/fail")
@require_runner
def fail(task_id: int):
    """Store the error; requeue when a retry makes sense and attempts are left."""
    body = json_body({"lease_token", "error", "retry"})
    status = services().scheduler.fail(task_id, _lease_token(body), field(body, "error", str),
                                       field(body, "retry", bool, required=False, default=True))
    return {"status": status.value}


@bp.post("/task/<int:task_id>/release")
@require_runner
def release(task_id: int):
    """Hand the task back to the queue without spending an attempt."""
    body = json_body({"lease_token"})
    services().scheduler.release(task_id, _lease_token(body))
    return {"status": "queued"}
