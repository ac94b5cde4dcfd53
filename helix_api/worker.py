"""Worker API: how runners inside model containers claim tasks, report, and finish them."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, request

from . import scheduler
from .auth import require_runner
from .db import get_db
from .errors import InvalidField
from .validation import field, json_body, parse_mode, parse_type, query_number

bp = Blueprint("worker", __name__, url_prefix="/api/v1/worker")

MAX_EVENTS_PER_POST = 1000
_RUNNER_KINDS = ("token", "progress", "log")


def _policy() -> scheduler.LeasePolicy:
    return current_app.extensions["helix_policy"]


def _lease_token(body: dict[str, Any]) -> str:
    return field(body, "lease_token", str)


@bp.get("/task")
@require_runner
def claim():
    """Claim the next matching task (200 with a lease) or say there is none (204)."""
    settings = current_app.config
    mode = parse_mode(request.args.get("mode", "create"))
    type_ = parse_type(request.args.get("type", "text"))
    model_name = request.args.get("model_name")
    if not model_name:
        raise InvalidField("Query parameter 'model_name' is required.", field="model_name")
    wait = query_number("wait", 0.0, 0.0, settings["MAX_WAIT_SECONDS"])
    runner = (request.headers.get("X-Helix-Runner") or g.caller.name)[:200]
    claimed = scheduler.claim_waiting(
        get_db(), scheduler.QueueFilter(mode, type_, model_name), wait=wait,
        recheck=settings["RECHECK_SECONDS"], reap_every=settings["REAP_SECONDS"],
        runner=runner, runner_token_id=g.caller.id, policy=_policy())
    if claimed is None:
        return Response(status=204)
    task, lease = claimed
    return {"task": scheduler.task_payload(task), "lease": lease.to_json()}


@bp.post("/task/<int:task_id>/heartbeat")
@require_runner
def heartbeat(task_id: int):
    """Renew the lease; tells the runner if the task was cancelled."""
    body = json_body({"lease_token"})
    expires = scheduler.heartbeat(get_db(), task_id, _lease_token(body), _policy())
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
    items = field(body, "events", list)
    if len(items) > MAX_EVENTS_PER_POST:
        raise InvalidField(f"At most {MAX_EVENTS_PER_POST} events per post.", field="events")
    checked = [_event(raw, i) for i, raw in enumerate(items)]
    return scheduler.add_events(get_db(), task_id, _lease_token(body), checked, _policy())


@bp.post("/task/<int:task_id>/complete")
@require_runner
def complete(task_id: int):
    """Store the result."""
    body = json_body({"lease_token", "result"})
    result = field(body, "result", dict)
    scheduler.complete(get_db(), task_id, _lease_token(body), result)
    return {"status": "complete"}


@bp.post("/task/<int:task_id>/fail")
@require_runner
def fail(task_id: int):
    """Store the error; requeue when a retry makes sense and attempts are left."""
    body = json_body({"lease_token", "error", "retry"})
    status = scheduler.fail(get_db(), task_id, _lease_token(body), field(body, "error", str),
                            field(body, "retry", bool, required=False, default=True))
    return {"status": status.value}


@bp.post("/task/<int:task_id>/release")
@require_runner
def release(task_id: int):
    """Hand the task back to the queue without spending an attempt."""
    body = json_body({"lease_token"})
    scheduler.release(get_db(), task_id, _lease_token(body))
    return {"status": "queued"}
