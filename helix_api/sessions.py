"""Session API: what users and programs call to chat, draw, fine-tune and follow along."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, request, send_file, stream_with_context
from sqlalchemy import select

from . import conversations, events, files, scheduler, training_data
from .auth import require_user
from .errors import InvalidField
from .models import File, Mode, SessionType
from .params import check_params
from .services import services
from .validation import field, json_body, parse_mode, parse_type, query_number

bp = Blueprint("sessions", __name__, url_prefix="/api/v1/sessions")


def _params(body: dict) -> dict:
    return field(body, "params", dict, required=False, default={})


def _message(body: dict) -> str:
    message = field(body, "message", str)
    if not message.strip():
        raise InvalidField("Field 'message' must not be empty.", field="message")
    return message


@bp.post("")
@require_user
def create_session():
    """Start a session with its first message, or (multipart, with training files) a fine-tune."""
    if request.mimetype == "multipart/form-data":
        return _create_finetune()
    body = json_body({"mode", "type", "model_name", "message", "params", "name"})
    mode = parse_mode(field(body, "mode", str, required=False, default="create"))
    type_ = parse_type(field(body, "type", str, required=False, default="text"))
    if mode == Mode.FINETUNE:
        raise InvalidField("A fine-tune needs training files: send multipart/form-data with the files in "
                           "'files' and mode, type, model_name and params as form fields.", field="mode")
    return start(user_id=g.caller.id, mode=mode, type_=type_, model_name=field(body, "model_name", str),
                 params=_params(body), message=body.get("message"),
                 name=field(body, "name", str, required=False)), 201


def _create_finetune():
    # Training data is far bigger than a JSON body: this request gets the upload limit.
    request.max_content_length = services().settings["MAX_UPLOAD_BYTES"]
    allowed = {"mode", "type", "model_name", "message", "params", "name"}
    unknown = sorted(set(request.form) - allowed) + sorted(set(request.files) - {"files"})
    if unknown:
        raise InvalidField(f"Unknown form field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))} and files.",
                           field=unknown[0])
    form = request.form
    mode = parse_mode(form.get("mode", "finetune"))
    if mode != Mode.FINETUNE:
        raise InvalidField("Multipart uploads start fine-tunes: set mode=finetune, or send JSON for a chat.",
                           field="mode")
    try:
        params = json.loads(form.get("params") or "{}")
    except ValueError as exc:
        raise InvalidField(f"Field 'params' must be a JSON object: {exc}", field="params") from None
    if not isinstance(params, dict):
        raise InvalidField("Field 'params' must be a JSON object.", field="params")
    return start_finetune(user_id=g.caller.id, type_name=form.get("type", "text"),
                          model_name=form.get("model_name", ""), params=params,
                          uploads=request.files.getlist("files"), message=form.get("message") or None,
                          name=form.get("name") or None), 201


# What the JSON API and the web app both do with what a user sent: the checks and the work are one.


def start(*, user_id: int, mode: Mode, type_: SessionType, model_name: str, params: dict, message: Any,
          name: str | None = None) -> dict:
    """Check a new session's model, params and first message, and queue its reply; the session's JSON."""
    model = services().catalog.get(model_name, type_.value)
    params = check_params(params, mode, type_, services().limits)
    return conversations.create(
        services().database, user_id=user_id, mode=mode, type_=type_, model_name=model.name,
        message=_message({"message": message}), params=params, name=name, policy=services().policy)


def say(*, user_id: int, session_id: int, message: Any, params: dict) -> None:
    """Continue a session with a message (params checked against the session's kind of task)."""
    conversations.add_message(services().database, user_id=user_id, session_id=session_id,
                              message=_message({"message": message}), params=params, policy=services().policy,
                              limits=services().limits)


def start_finetune(*, user_id: int, type_name: str, model_name: str, params: dict, uploads: list[Any],
                   message: str | None = None, name: str | None = None) -> dict:
    """Check a fine-tune's model, params and training files, store them and queue its training.

    The request must already allow uploads (`request.max_content_length`). Nothing is stored when a
    check fails; an InvalidTrainingData names each bad file and line.
    """
    settings = services().settings
    type_ = parse_type(type_name)
    if not model_name:
        raise InvalidField("Field 'model_name' is required.", field="model_name")
    model = services().catalog.get(model_name, type_.value)
    check_params(params, Mode.FINETUNE, type_, services().limits)
    if type_ == SessionType.TEXT:
        data = training_data.check_text(uploads, settings["MIN_TEXT_EXAMPLES"])
    else:
        data = training_data.check_images(uploads, min_images=settings["MIN_TRAINING_IMAGES"],
                                          max_bytes=settings["MAX_TRAINING_IMAGE_BYTES"],
                                          max_side=settings["MAX_TRAINING_IMAGE_SIDE"])
    return conversations.create_finetune(
        services().database, services().store, user_id=user_id, type_=type_, model_name=model.name, message=message,
        params=params, name=name, data=data, uploads=uploads, policy=services().policy,
        max_file_bytes=settings["MAX_FILE_BYTES"])


def cancel_reply(user_id: int, session_id: int) -> None:
    """Cancel the queued or running reply of one of the user's sessions."""
    database = services().database
    with database.read() as db:
        conversations.owned(db, user_id, session_id)
    scheduler.cancel(database, session_id)


def shown(user_id: int, session_id: int) -> dict:
    """One of the user's sessions as JSON, with its interactions, progress and place in the queue."""
    with services().database.read() as db:
        session = conversations.owned(db, user_id, session_id, load=True)
        return conversations.session_json(db, session)


def event_stream(user_id: int, session_id: int) -> Response:
    """The session's events as Server-Sent Events: after Last-Event-ID (or `?after=`), then live."""
    database = services().database
    with database.read() as db:
        conversations.owned(db, user_id, session_id)
    raw_after = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
    if not raw_after.isdigit():
        raise InvalidField(f"Last-Event-ID must be an event id (a whole number), not {raw_after!r}.",
                           field="Last-Event-ID")
    follow = request.args.get("follow", "1").lower() not in {"0", "false", "no"}
    settings = services().settings
    body = events.stream(database, session_id, int(raw_after), follow=follow,
                         keepalive=settings["SSE_KEEPALIVE_SECONDS"], recheck=settings["RECHECK_SECONDS"])
    return Response(stream_with_context(body), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def file_bytes(user_id: int, session_id: int, file_id: int) -> Response:
    """A file's bytes for its owner: images inline (a browser shows them), the rest as downloads."""
    with services().database.read() as db:
        row = files.owned(db, user_id, session_id, file_id)
    inline = row.content_type.startswith("image/")
    return send_file(services().store.open(row.path), mimetype=row.content_type, download_name=row.name,
                     as_attachment=not inline, max_age=0)


@bp.get("")
@require_user
def list_sessions():
    """The caller's sessions, newest first."""
    settings = services().settings
    limit = int(query_number("limit", settings["PAGE_SIZE"], 1, settings["MAX_PAGE_SIZE"]))
    before = request.args.get("before")
    before_id = int(query_number("before", 0, 1, 2**62)) if before else None
    with services().database.read() as db:
        return conversations.page(db, g.caller.id, limit=limit, before=before_id)


@bp.get("/<int:session_id>")
@require_user
def get_session(session_id: int):
    """One session with its interactions, progress and place in the queue."""
    return shown(g.caller.id, session_id)


@bp.post("/<int:session_id>/messages")
@require_user
def add_message(session_id: int):
    """Continue a session."""
    body = json_body({"message", "params"})
    say(user_id=g.caller.id, session_id=session_id, message=body.get("message"), params=_params(body))
    return shown(g.caller.id, session_id), 201


@bp.post("/<int:session_id>/cancel")
@require_user
def cancel(session_id: int):
    """Cancel the queued or running reply."""
    cancel_reply(g.caller.id, session_id)
    return shown(g.caller.id, session_id)


@bp.get("/<int:session_id>/events")
@require_user
def session_events(session_id: int):
    """Server-Sent Events: everything after Last-Event-ID (or `?after=`), then live events."""
    return event_stream(g.caller.id, session_id)


@bp.get("/<int:session_id>/files")
@require_user
def list_files(session_id: int):
    """Every file of the session: uploads, outputs, adapters."""
    with services().database.read() as db:
        conversations.owned(db, g.caller.id, session_id)
        rows = db.scalars(select(File).where(File.session_id == session_id).order_by(File.id))
        return {"files": [files.file_json(row) for row in rows]}


@bp.get("/<int:session_id>/files/<int:file_id>")
@require_user
def download_file(session_id: int, file_id: int):
    """A file's bytes, for its owner only."""
    return file_bytes(g.caller.id, session_id, file_id)
