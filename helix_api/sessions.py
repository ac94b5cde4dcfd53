"""Session API: what users and programs call to chat, draw, fine-tune and follow along."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from . import conversations, events, scheduler
from .auth import require_user
from .catalog import Catalog
from .db import get_db
from .errors import InvalidField
from .validation import field, json_body, parse_mode, parse_type, query_number

bp = Blueprint("sessions", __name__, url_prefix="/api/v1/sessions")


def _policy() -> scheduler.LeasePolicy:
    return current_app.extensions["helix_policy"]


def _params(body: dict) -> dict:
    return field(body, "params", dict, required=False, default={})


def _message(body: dict) -> str:
    message = field(body, "message", str)
    if not message.strip():
        raise InvalidField("Field 'message' must not be empty.", field="message")
    return message


def _show(session_id: int, status: int = 200):
    with get_db().read() as db:
        session = conversations.owned(db, g.caller.id, session_id, load=True)
        return conversations.session_json(db, session), status


@bp.post("")
@require_user
def create_session():
    """Start a session with its first message."""
    body = json_body({"mode", "type", "model_name", "message", "params", "name"})
    mode = parse_mode(field(body, "mode", str, required=False, default="create"))
    type_ = parse_type(field(body, "type", str, required=False, default="text"))
    catalog: Catalog = current_app.extensions["helix_catalog"]
    model = catalog.get(field(body, "model_name", str), type_.value)
    return conversations.create(
        get_db(), user_id=g.caller.id, mode=mode, type_=type_, model_name=model.name,
        message=_message(body), params=_params(body), name=field(body, "name", str, required=False),
        policy=_policy()), 201


@bp.get("")
@require_user
def list_sessions():
    """The caller's sessions, newest first."""
    settings = current_app.config
    limit = int(query_number("limit", settings["PAGE_SIZE"], 1, settings["MAX_PAGE_SIZE"]))
    before = request.args.get("before")
    before_id = int(query_number("before", 0, 1, 2**62)) if before else None
    with get_db().read() as db:
        return conversations.page(db, g.caller.id, limit=limit, before=before_id)


@bp.get("/<int:session_id>")
@require_user
def get_session(session_id: int):
    """One session with its interactions, progress and place in the queue."""
    return _show(session_id)


@bp.post("/<int:session_id>/messages")
@require_user
def add_message(session_id: int):
    """Continue a session."""
    body = json_body({"message", "params"})
    conversations.add_message(get_db(), user_id=g.caller.id, session_id=session_id,
                              message=_message(body), params=_params(body), policy=_policy())
    return _show(session_id, 201)


@bp.post("/<int:session_id>/cancel")
@require_user
def cancel(session_id: int):
    """Cancel the queued or running reply."""
    database = get_db()
    with database.read() as db:
        conversations.owned(db, g.caller.id, session_id)
    scheduler.cancel(database, session_id)
    return _show(session_id)


@bp.get("/<int:session_id>/events")
@require_user
def session_events(session_id: int):
    """Server-Sent Events: everything after Last-Event-ID (or `?after=`), then live events."""
    database = get_db()
    with database.read() as db:
        conversations.owned(db, g.caller.id, session_id)
    raw_after = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
    if not raw_after.isdigit():
        raise InvalidField(f"Last-Event-ID must be an event id (a whole number), not {raw_after!r}.",
                           field="Last-Event-ID")
    follow = request.args.get("follow", "1").lower() not in {"0", "false", "no"}
    settings = current_app.config
    body = events.stream(database, session_id, int(raw_after), follow=follow,
                         keepalive=settings["SSE_KEEPALIVE_SECONDS"], recheck=settings["RECHECK_SECONDS"])
    return Response(stream_with_context(body), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
