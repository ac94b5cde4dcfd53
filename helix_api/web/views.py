"""The web app's pages: sessions, the forms that start and continue them, and what their script follows.

Every form ends in the functions the JSON API calls (helix_api/sessions/actions.py); a refused form is
shown again with what was typed and the API's message next to the field at fault.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from flask import flash, g, redirect, render_template, request, url_for

from helix_api import responses
from helix_api.accounts import usage
from helix_api.errors import Forbidden, HelixError, NotCancellable
from helix_api.models import OPEN_INTERACTION_STATES, Mode, SessionType, utcnow
from helix_api.ops import overview
from helix_api.schemas.base import INT32_MAX
from helix_api.services import services
from helix_api.sessions import actions
from helix_api.tasks import runners
from helix_api.validation import event_cursor
from helix_api.web import bp
from helix_api.web.forms import (
    CHAT_PARAMS,
    FINETUNE_PARAMS,
    IMAGE_PARAMS,
    field_errors,
    params_from,
    refuse_unstorable,
    shown_again,
)
from helix_api.web.signin import signed_in, signed_in_feed

logger = logging.getLogger(__name__)

_NEW_FORMS = {
    "chat": ("web/new_chat.html", SessionType.TEXT, CHAT_PARAMS),
    "image": ("web/new_image.html", SessionType.IMAGE, IMAGE_PARAMS),
}


def _models(type_: str) -> list[str]:
    return services().catalog.names(type_)


def _shown_fields(params: dict[str, type], *names: str) -> set[str]:
    return {*names, *(f"params.{name}" for name in params)}


@bp.get("/")
@signed_in
def session_list():
    """The user's sessions, newest first, a page at a time."""
    svc = services()
    before = request.args.get("before", type=int)
    if before is not None and not 1 <= before <= INT32_MAX:
        before = None  # a cursor no session id can have: the first page
    page = actions.page(svc, g.caller.id, limit=svc.settings["PAGE_SIZE"], before=before)
    return render_template("web/sessions.html", page=page, before=before)


def _new_session(kind: str):
    template, type_, param_fields = _NEW_FORMS[kind]
    models = _models(type_.value)
    form = request.form if request.method == "POST" else {}
    if request.method == "GET":
        return render_template(template, models=models, form=form, errors={})
    try:
        refuse_unstorable(form, param_fields)
        created = actions.start(services(), user_id=g.caller.id, mode=Mode.CREATE, type_=type_,
                                        model_name=form.get("model_name", ""), message=form.get("message", ""),
                                        params=params_from(form, param_fields))
    except HelixError as err:
        errors = field_errors(err, _shown_fields(param_fields, "model_name", "message"))
        return render_template(template, models=models, form=shown_again(form), errors=errors), err.status_code
    return redirect(url_for("web.session_page", session_id=created["id"]))


@bp.route("/new/chat", methods=["GET", "POST"])
@signed_in
def new_chat():
    """Start a chat: a text model, a first message and optional generation params."""
    return _new_session("chat")


@bp.route("/new/image", methods=["GET", "POST"])
@signed_in
def new_image():
    """Start an image session: an image model, a prompt, the size, steps, number of images and seed."""
    return _new_session("image")


@bp.route("/new/finetune", methods=["GET", "POST"])
@signed_in
def new_finetune():
    """Fine-tune a model on uploaded training data (JSONL chats, or captioned images)."""
    models = {"text": _models("text"), "image": _models("image")}
    form = request.form if request.method == "POST" else {"type": request.args.get("type", "text")}
    if request.method == "GET":
        return render_template("web/new_finetune.html", models=models, form=form, errors={})
    try:
        refuse_unstorable(form, FINETUNE_PARAMS)
        created = actions.start_finetune(
            services(), user_id=g.caller.id, type_name=form.get("type", "text"), model_name=form.get("model_name", ""),
            params=params_from(form, FINETUNE_PARAMS), uploads=request.files.getlist("files"),
            name=form.get("name", "").strip() or None)
    except HelixError as err:
        errors = field_errors(err, _shown_fields(FINETUNE_PARAMS, "type", "model_name", "files", "name"))
        return (render_template("web/new_finetune.html", models=models, form=shown_again(form), errors=errors),
                err.status_code)
    return redirect(url_for("web.session_page", session_id=created["id"]))


def _render_session(session_id: int, *, form: dict | None = None, errors: dict | None = None, status: int = 200):
    svc = services()
    session = actions.shown(services(), g.caller.id, session_id)
    last = session["interactions"][-1] if session.get("interactions") else None
    live = last if last and last["creator"] == "assistant" and last["state"] in OPEN_INTERACTION_STATES else None
    # The page replays its open reply from the start (see events.before_first).
    stream_after = actions.replay_start(svc, live["task"]["id"]) if live and live.get("task") else None
    param_fields = CHAT_PARAMS if session["type"] == SessionType.TEXT.value else IMAGE_PARAMS
    return render_template("web/session.html", session=session, live=live, stream_after=stream_after,
                           can_continue=session["mode"] == Mode.CREATE.value and live is None,
                           param_fields=param_fields, form=form or {}, errors=errors or {}), status


@bp.get("/sessions/<int:session_id>")
@signed_in
def session_page(session_id: int):
    """A session's thread; its open reply follows live, and the form below continues it."""
    return _render_session(session_id)


@bp.post("/sessions/<int:session_id>/messages")
@signed_in
def session_message(session_id: int):
    """Continue a session (a chat message or a prompt, with optional params)."""
    form = request.form
    svc = services()
    type_ = actions.session_type(svc, g.caller.id, session_id)
    param_fields = CHAT_PARAMS if type_ == SessionType.TEXT else IMAGE_PARAMS
    try:
        refuse_unstorable(form, param_fields)
        actions.say(svc, user_id=g.caller.id, session_id=session_id, message=form.get("message", ""),
                            params=params_from(form, param_fields))
    except HelixError as err:
        if err.status_code == 404:
            raise
        errors = field_errors(err, _shown_fields(param_fields, "message"))
        return _render_session(session_id, form=shown_again(form), errors=errors, status=err.status_code)
    return redirect(url_for("web.session_page", session_id=session_id))


@bp.post("/sessions/<int:session_id>/cancel")
@signed_in
def session_cancel(session_id: int):
    """Cancel the session's queued or running reply."""
    try:
        actions.cancel_reply(services(), g.caller.id, session_id)
    except NotCancellable as err:
        flash(err.message)  # it finished meanwhile: the page shows how
    return redirect(url_for("web.session_page", session_id=session_id))


@bp.get("/sessions/<int:session_id>/events")
@signed_in_feed
def session_events(session_id: int):
    """The session's event stream for its page (EventSource sends the cookie, not a Bearer header)."""
    feed = actions.event_feed(services(), g.caller.id, session_id)  # a stranger's: 404, whatever the cursor
    after, follow = event_cursor()
    return responses.event_stream(feed(after, follow=follow))


@bp.get("/sessions/<int:session_id>/state")
@signed_in_feed
def session_state(session_id: int) -> dict[str, Any]:
    """The session as JSON, for the page's script: its place in the queue, the finished reply and its tool calls."""
    return actions.shown(services(), g.caller.id, session_id)


@bp.get("/sessions/<int:session_id>/files/<int:file_id>")
@signed_in_feed
def session_file(session_id: int, file_id: int):
    """A file of the session, for its page: images inline, the rest as downloads."""
    return responses.owner_file(*actions.open_file(services(), g.caller.id, session_id, file_id))


@bp.get("/admin")
@signed_in
def admin_page():
    """For admins: the runners seen, each model's queue, and recent failures with their errors."""
    if not g.caller.is_admin:
        raise Forbidden("This page is for admins (helix users create NAME --admin).")
    svc = services()
    database = svc.database
    return render_template("web/admin.html", usage=usage.per_user(database),
                           overview=overview.overview(database, gone_after=runners.gone_after(svc.settings)))


@bp.get("/usage")
@signed_in
def usage_page():
    """What the signed-in user has used: per model, and per day over the last 30 days."""
    svc = services()
    database = svc.database
    since = utcnow() - timedelta(days=30)
    return render_template("web/usage.html", by_model=usage.report(database, g.caller.id, shown=svc.catalog.shown),
                           by_day=usage.report(database, g.caller.id, start=since, group_by="day"))
