"""Session API: what users and programs call to chat, draw, fine-tune and follow along."""

from __future__ import annotations

from flask import Blueprint, g, request

from helix_api import responses
from helix_api.accounts.auth import require_user
from helix_api.errors import InvalidField, echo
from helix_api.models import Mode
from helix_api.schemas import sessions as schemas
from helix_api.services import services
from helix_api.sessions import actions
from helix_api.validation import (
    allow_uploads,
    event_cursor,
    field,
    json_body,
    json_object_text,
    parse_mode,
    parse_type,
    query,
    query_number,
    values,
)

bp = Blueprint("sessions", __name__, url_prefix="/api/v1/sessions")


def _params(body: dict) -> dict:
    return field(body, "params", dict, required=False, default={})


@bp.post("")
@require_user
def create_session():
    """Start a session with its first message, or (multipart, with training files) a fine-tune."""
    if request.mimetype == "multipart/form-data":
        return _create_finetune()
    body = json_body(schemas.SessionCreate)
    mode = parse_mode(field(body, "mode", str, required=False, default="create"))
    type_ = parse_type(field(body, "type", str, required=False, default="text"))
    if mode == Mode.FINETUNE:
        raise InvalidField("A fine-tune needs training files: send multipart/form-data with the files in "
                           "'files' and mode, type, model_name and params as form fields.", field="mode")
    return actions.start(
        services(), user_id=g.caller.id, mode=mode, type_=type_, model_name=field(body, "model_name", str),
        params=_params(body), message=body.get("message"), name=field(body, "name", str, required=False),
        knowledge=body.get("knowledge")), 201


def _create_finetune():
    allow_uploads(services().settings["MAX_UPLOAD_BYTES"])  # training data is far bigger than a JSON body
    allowed = {"mode", "type", "model_name", "message", "params", "name"}
    unknown = sorted(set(request.form) - allowed) + sorted(set(request.files) - {"files"})
    if unknown:
        raise InvalidField(f"Unknown form field {echo(unknown[0])}; allowed: {', '.join(sorted(allowed))} and files.",
                           field=unknown[0])
    form = values(schemas.FinetuneForm, request.form)
    mode = parse_mode(form.get("mode", "finetune"))
    if mode != Mode.FINETUNE:
        raise InvalidField("Multipart uploads start fine-tunes: set mode=finetune, or send JSON for a chat.",
                           field="mode")
    params = json_object_text(form.get("params") or "{}", "params")
    return actions.start_finetune(
        services(), user_id=g.caller.id, type_name=form.get("type", "text"), model_name=form.get("model_name", ""),
        params=params, uploads=request.files.getlist("files"), message=form.get("message") or None,
        name=form.get("name") or None), 201


@bp.get("")
@require_user
def list_sessions():
    """The caller's sessions, newest first."""
    svc = services()
    limit = int(query_number("limit", svc.settings["PAGE_SIZE"], 1, svc.settings["MAX_PAGE_SIZE"]))
    before = query(schemas.SessionPage).get("before")
    return actions.page(svc, g.caller.id, limit=limit, before=before)


@bp.get("/<int:session_id>")
@require_user
def get_session(session_id: int):
    """One session with its interactions, progress and place in the queue."""
    return actions.shown(services(), g.caller.id, session_id)


@bp.post("/<int:session_id>/messages")
@require_user
def add_message(session_id: int):
    """Continue a session."""
    body = json_body(schemas.SessionMessage)
    svc = services()
    actions.say(svc, user_id=g.caller.id, session_id=session_id, message=body.get("message"),
                        params=_params(body))
    return actions.shown(svc, g.caller.id, session_id), 201


@bp.post("/<int:session_id>/score")
@require_user
def score(session_id: int):
    """Score candidate replies to a prompt with a completed reward-model fine-tune: one score per candidate."""
    body = json_body(schemas.ScoreRequest)
    return actions.score(services(), user_id=g.caller.id, session_id=session_id, prompt=body.get("prompt"),
                                 candidates=body.get("candidates"))


@bp.post("/<int:session_id>/cancel")
@require_user
def cancel(session_id: int):
    """Cancel the queued or running reply."""
    svc = services()
    actions.cancel_reply(svc, g.caller.id, session_id)
    return actions.shown(svc, g.caller.id, session_id)


@bp.get("/<int:session_id>/events")
@require_user
def session_events(session_id: int):
    """Server-Sent Events: everything after Last-Event-ID (or `?after=`), then live events."""
    feed = actions.event_feed(services(), g.caller.id, session_id)  # a stranger's: 404, whatever the cursor
    after, follow = event_cursor()
    return responses.event_stream(feed(after, follow=follow))


@bp.get("/<int:session_id>/files")
@require_user
def list_files(session_id: int):
    """Every file of the session: uploads, outputs, adapters."""
    return {"files": actions.file_list(services(), g.caller.id, session_id)}


@bp.get("/<int:session_id>/files/<int:file_id>")
@require_user
def download_file(session_id: int, file_id: int):
    """A file's bytes, for its owner only."""
    return responses.owner_file(*actions.open_file(services(), g.caller.id, session_id, file_id))
