"""Worker API: how runners inside model containers claim tasks, report, and finish them.

Only this blueprint speaks the runners' wire format, so a task's shape on the wire (`task_payload`)
is defined here too.
"""

from __future__ import annotations

import functools
import select
import socket
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, request

from helix_api import responses
from helix_api.accounts.auth import require_runner
from helix_api.errors import InvalidField
from helix_api.schemas import worker as schemas
from helix_api.services import services
from helix_api.sessions import files
from helix_api.tasks import claims
from helix_api.tasks import files as task_files
from helix_api.tasks.claims import ClaimRule, Kind
from helix_api.validation import field, json_body, parse_mode, parse_type, query, query_number, values

# A completed task's result (over the app's 1 MiB cap for any other body): only runners send it.
MAX_RESULT_BYTES = 16 * 1024 * 1024

bp = Blueprint("worker", __name__, url_prefix="/api/v1/worker")

MAX_EVENTS_PER_POST = schemas.MAX_EVENTS_PER_POST
MAX_POSTS_PER_REQUEST = schemas.MAX_POSTS_PER_REQUEST


def _lease_token(body: dict[str, Any]) -> str:
    return field(body, "lease_token", str)


def _runner_name() -> str:
    """The runner's own name (a host may run several under one token), else its token's name."""
    name = request.headers.get("X-Helix-Runner")
    if name:
        name = values(schemas.RunnerHeaders, {"X-Helix-Runner": name})["runner"]
    return (name or g.caller.name)[:200]


@bp.get("/task")
@require_runner
def claim():
    """Claim the next matching task (200 with a lease), or up to `max` of them, or say there is none (204)."""
    svc = services()
    args = query(schemas.Claim)
    wait = query_number("wait", 0.0, 0.0, svc.settings["MAX_WAIT_SECONDS"])
    most = args.get("max")
    runner = _runner_name()
    gone = hang_up_check(request.environ) if wait else None
    claimed = svc.scheduler.claim_waiting(
        ClaimRule(_kinds(args), warm=_warm(), rules=svc.policy.rules), wait=wait, client_gone=gone, runner=runner,
        runner_token_id=g.caller.id, count=most or 1)
    if not claimed:
        return Response(status=204)
    if most is None:  # the single-task shape, which every runner before `max` reads
        return claimed_payload(*claimed[0])
    return {"tasks": [claimed_payload(task, lease) for task, lease in claimed]}


def _kinds(args: dict[str, Any]) -> tuple[Kind, ...]:
    """The queues a poll names: `mode`, `type` and `model_name` (one), or repeated `kind=MODE:TYPE:MODEL`."""
    catalog = services().catalog
    spelled = request.args.getlist("kind")
    if not spelled:
        if "model_name" not in args:
            raise InvalidField("Name the queue to poll: model_name (with mode and type), or one or more "
                               "kind=MODE:TYPE:MODEL.", field="model_name")
        return (Kind(parse_mode(args.get("mode", "create"), claim=True), parse_type(args.get("type", "text")),
                     catalog.resolve(args["model_name"])),)
    if "model_name" in args or "mode" in args or "type" in args:
        raise InvalidField("Send either mode/type/model_name or kind=MODE:TYPE:MODEL, not both.", field="kind")
    if len(spelled) > schemas.MAX_KINDS:
        raise InvalidField(f"At most {schemas.MAX_KINDS} kinds per poll.", field="kind")
    kinds = []
    for index, text in enumerate(spelled):
        where = f"kind[{index}]"
        mode, _, rest = text.partition(":")
        type_, _, model_name = rest.partition(":")
        if not model_name.strip():
            raise InvalidField(f"Field {where!r} must read MODE:TYPE:MODEL, as create:text:mistral-7b-instruct.",
                               field=where)
        kinds.append(Kind(parse_mode(mode, f"{where}.mode", claim=True), parse_type(type_, f"{where}.type"),
                          catalog.resolve(model_name)))
    return tuple(dict.fromkeys(kinds))


def _warm() -> tuple[str, ...]:
    """The adapter keys a poll says its runner holds (repeated `warm=KEY`)."""
    keys = request.args.getlist("warm")
    if len(keys) > schemas.MAX_WARM:
        raise InvalidField(f"At most {schemas.MAX_WARM} warm adapters per poll.", field="warm")
    for index, key in enumerate(keys):
        if not claims.ADAPTER_KEY.fullmatch(key):
            raise InvalidField(f"Field 'warm[{index}]' must be an adapter's checksum (letters, digits and '-', "
                               "at most 128).", field=f"warm[{index}]")
    return tuple(keys)


def claimed_payload(task: Any, lease: Any) -> dict[str, Any]:
    """A claimed task and its lease, as a claim (or a complete that claimed the next task) answers."""
    return {"task": task_payload(task), "lease": lease.to_json()}


def task_payload(task: Any) -> dict[str, Any]:
    """A task as the worker API hands it to a runner."""
    return {"id": task.id, "session_id": task.session_id, "interaction_id": task.interaction_id,
            "mode": task.mode.value, "type": task.type.value, "model_name": task.model_name,
            "attempt": task.attempt, "input": task.input, "params": task.params,
            "adapter": task.input.get("adapter"), "files": task.input.get("files", [])}


def hang_up_check(environ: dict[str, Any]) -> Callable[[], bool] | None:
    """A check that the runner behind this request hung up, or None where the server gives no socket.

    gunicorn hands the connection's socket to the app (`gunicorn.socket`); test clients have none,
    and nobody can hang up there.
    """
    sock = environ.get("gunicorn.socket")
    return functools.partial(hung_up, sock) if sock is not None else None


def hung_up(sock: socket.socket) -> bool:
    """True once the client closed its end: a waiting runner sends nothing, so readable means EOF.

    poll(), not select(): select() refuses descriptors past 1024, which a node holding a thousand
    runners' connections hands out (and every poll would then look hung up).
    """
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:  # readable, yet nothing to read after all: still there
        return False
    except (OSError, ValueError):  # closed or reset under us
        return True


@bp.post("/runners")
@require_runner
def report_runner():
    """Store what the runner says it is (hardware, backend, kinds, slots, adapters, version), sent at its start."""
    report = json_body(schemas.RunnerReport)
    svc = services()
    name = _runner_name()
    svc.scheduler.runners.report(name, _checked_report(report), runner_token_id=g.caller.id)
    return {"name": name, "stored": True}


@bp.post("/task/<int:task_id>/heartbeat")
@require_runner
def heartbeat(task_id: int):
    """Renew the lease; tells the runner if the task was cancelled. A `runner` report is stored on the way."""
    body = json_body(schemas.Heartbeat)
    svc = services()
    runner = _runner_name()
    if body.get("runner") is not None:
        # Checked whole before anything is stored: a bad report refuses the beat and leaves the last good one.
        report = _checked_report(body["runner"], "runner.")
        svc.scheduler.runners.reported(runner, report, runner_token_id=g.caller.id)
    expires = svc.scheduler.heartbeat(task_id, _lease_token(body), runner=runner)
    return {"cancelled": expires is None, "lease_expires_at": expires.isoformat() if expires else None}


def _checked_report(report: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The report, checked where the schema cannot check across fields (busy within total, free within total),
    with its kinds named as claims name them (mode `create` for `inference`, a model alias's full name)."""
    slots = report["slots"]
    if slots["busy"] > slots["total"]:
        raise InvalidField(f"Field '{prefix}slots.busy' ({slots['busy']}) is more than slots.total "
                           f"({slots['total']}).", field=f"{prefix}slots.busy")
    for index, gpu in enumerate(report["hardware"]["gpus"]):
        if gpu["memory_free"] > gpu["memory_total"]:
            where = f"{prefix}hardware.gpus[{index}].memory_free"
            raise InvalidField(f"Field {where!r} is more than the GPU's memory_total.", field=where)
    cpu = report["hardware"]["cpu"]
    if cpu["memory_available"] > cpu["memory_total"]:
        where = f"{prefix}hardware.cpu.memory_available"
        raise InvalidField(f"Field {where!r} is more than the CPU's memory_total.", field=where)
    catalog = services().catalog
    kinds = [{"mode": parse_mode(kind["mode"], f"{prefix}kinds[{index}].mode", claim=True).value,
              "type": parse_type(kind["type"], f"{prefix}kinds[{index}].type").value,
              "model_name": catalog.resolve(kind["model_name"])} for index, kind in enumerate(report["kinds"])]
    return {**report, "kinds": kinds}


@bp.post("/task/<int:task_id>/events")
@require_runner
def post_events(task_id: int):
    """Store tokens, progress and log lines, each once by its seq."""
    body = json_body(schemas.EventsPost)
    return services().scheduler.add_events(task_id, body["lease_token"], body["events"])


@bp.post("/events")
@require_runner
def post_events_many():
    """Events of several tasks a runner holds, in one request: each task's answer says how it went."""
    body = json_body(schemas.EventsMany)
    posts = [(post["task_id"], post["lease_token"], post["events"]) for post in body["posts"]]
    return {"results": services().scheduler.add_events_many(posts)}


@bp.post("/task/<int:task_id>/complete")
@require_runner
def complete(task_id: int):
    """Store the result, and the events the runner had not posted yet; with `claim_next`, claim its next task."""
    # A reply's log probabilities travel in its result: 4,096 tokens with 20 alternatives each are ~8 MB.
    request.max_content_length = MAX_RESULT_BYTES
    body = json_body(schemas.Complete)
    claim_next = bool(body.get("claim_next"))
    claimed = services().scheduler.complete(task_id, body["lease_token"], body["result"], body.get("events") or [],
                                            claim_next=_runner_name() if claim_next else None)
    if not claim_next:
        return {"status": "complete"}
    return {"status": "complete", "next": claimed_payload(*claimed) if claimed else None}


@bp.get("/task/<int:task_id>/files/<int:file_id>")
@require_runner
def download_file(task_id: int, file_id: int):
    """A file of the task's session (its training data), or the adapter it runs with."""
    token = request.headers.get("X-Helix-Lease", "")
    if not token:
        raise InvalidField("Send the task's lease token in the X-Helix-Lease header.", field="X-Helix-Lease")
    token = values(schemas.RunnerHeaders, {"X-Helix-Lease": token})["lease"]
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
    if not request.form.get("lease_token"):
        raise InvalidField("Form field 'lease_token' is required.", field="lease_token")
    if request.form.get("kind") not in ("output", "adapter"):
        raise InvalidField("Form field 'kind' must be output or adapter.", field="kind")
    form = values(schemas.Upload, request.form)
    token, kind = form["lease_token"], files.FileKind(form["kind"])
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
    body = json_body(schemas.Fail)
    status = services().scheduler.fail(task_id, _lease_token(body), field(body, "error", str),
                                       field(body, "retry", bool, required=False, default=True))
    return {"status": status.value}


@bp.post("/task/<int:task_id>/release")
@require_runner
def release(task_id: int):
    """Hand the task back to the queue without spending an attempt."""
    body = json_body(schemas.Lease)
    services().scheduler.release(task_id, _lease_token(body))
    return {"status": "queued"}
