"""What users do with their sessions: start, continue, cancel, read, follow, download.

The JSON API and the web app both end here, so a check and its message are one whichever a user
sent. Every function takes the app's `Services` and input already read from the request; none reads
the request or the app, so each can be called from anywhere that has services.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from helix_api.errors import InvalidField, NotReady
from helix_api.knowledge import bases
from helix_api.models import File, Mode, SessionType
from helix_api.openai import completions
from helix_api.params import COMPARISON_METHODS, REWARD_MODEL, check_params, training_method
from helix_api.services import Services
from helix_api.sessions import files, scoring, training_data
from helix_api.sessions import records as conversations
from helix_api.streaming import events, feed
from helix_api.tasks import scheduler
from helix_api.validation import field, parse_type

logger = logging.getLogger(__name__)


def _as_shown(services: Services, session: dict[str, Any]) -> dict[str, Any]:
    """A session's JSON with its model as users see it (the alias: a path never reaches a user)."""
    session["model_name"] = services.catalog.shown(session["model_name"])
    return session


def _message(value: Any) -> str:
    message = field({"message": value}, "message", str)
    if not message.strip():
        raise InvalidField("Field 'message' must not be empty.", field="message")
    return message


def start(services: Services, *, user_id: int, mode: Mode, type_: SessionType, model_name: str, params: dict,
          message: Any, name: str | None = None, knowledge: Any = None) -> dict[str, Any]:
    """Check a new session's model, params, first message and knowledge bases (ids of the user's, searched
    on every turn), and queue its reply; the session's JSON."""
    model = services.catalog.get(model_name, type_.value)
    params = check_params(params, mode, type_, services.limits)
    kb_ids = knowledge_bases(services, user_id, knowledge, type_)
    return _as_shown(services, conversations.create(
        services.database, user_id=user_id, mode=mode, type_=type_, model_name=model.name,
        message=_message(message), params=params, name=name, policy=services.policy, knowledge_bases=kb_ids,
        knowledge=services.retrieval))


def knowledge_bases(services: Services, user_id: int, value: Any, type_: SessionType) -> list[int]:
    """Knowledge base ids from a request, each checked to be the user's (404 otherwise)."""
    kb_ids = bases.parse_ids(value)
    if kb_ids and type_ != SessionType.TEXT:
        raise InvalidField("Only text sessions draw on knowledge bases.", field="knowledge")
    if kb_ids:
        with services.database.connect() as conn:
            bases.owned(conn, user_id, kb_ids)
    return kb_ids


def say(services: Services, *, user_id: int, session_id: int, message: Any, params: dict) -> None:
    """Continue a session with a message (params checked against the session's kind of task)."""
    with services.database.connect() as conn:
        if files.adapter_method(conn, session_id) == REWARD_MODEL:
            raise NotReady(f"Session {session_id} is a reward model: it scores replies "
                           f"(POST /api/v1/sessions/{session_id}/score) rather than answering messages.")
    conversations.add_message(services.database, user_id=user_id, session_id=session_id,
                              message=_message(message), params=params, policy=services.policy,
                              limits=services.limits, knowledge=services.retrieval)


def start_finetune(services: Services, *, user_id: int, type_name: str, model_name: str, params: dict,
                   uploads: list[Any], message: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Check a fine-tune's model, params and training files, store them and queue its training.

    Nothing is stored when a check fails; an InvalidTrainingData names each bad file and line. How
    big an upload may be is the caller's to enforce while reading the request.
    """
    settings = services.settings
    type_ = parse_type(type_name)
    if not model_name:
        raise InvalidField("Field 'model_name' is required.", field="model_name")
    model = services.catalog.get(model_name, type_.value)
    check_params(params, Mode.FINETUNE, type_, services.limits)
    if type_ == SessionType.TEXT and training_method(params) in COMPARISON_METHODS:
        data = training_data.check_comparisons(uploads, settings["MIN_COMPARISONS"])
    elif type_ == SessionType.TEXT:
        data = training_data.check_text(uploads, settings["MIN_TEXT_EXAMPLES"])
    else:
        data = training_data.check_images(uploads, min_images=settings["MIN_TRAINING_IMAGES"],
                                          max_bytes=settings["MAX_TRAINING_IMAGE_BYTES"],
                                          max_side=settings["MAX_TRAINING_IMAGE_SIDE"])
    return _as_shown(services, conversations.create_finetune(
        services.database, services.store, user_id=user_id, type_=type_, model_name=model.name,
        message=message, params=params, name=name, data=data, uploads=uploads, policy=services.policy,
        max_file_bytes=settings["MAX_FILE_BYTES"], model_shown=model.shown))


def score(services: Services, *, user_id: int, session_id: int, prompt: Any, candidates: Any) -> dict[str, Any]:
    """Score candidate replies to a prompt with one of the user's completed reward models; waits for the runner."""
    settings = services.settings
    prompt, candidates = scoring.check_request(prompt, candidates, int(settings["MAX_SCORE_CANDIDATES"]))
    started = scoring.start(services.database, services.policy, user_id=user_id, session_id=session_id,
                            prompt=prompt, candidates=candidates)
    task = completions.wait(services.database, started, timeout=float(settings["SCORE_WAIT_SECONDS"]),
                            recheck=settings["RECHECK_SECONDS"])
    return scoring.answer(started, task, candidates)


def cancel_reply(services: Services, user_id: int, session_id: int) -> None:
    """Cancel the queued or running reply of one of the user's sessions."""
    with services.database.orm_read() as db:
        conversations.owned(db, user_id, session_id)
    scheduler.cancel(services.database, session_id)


def shown(services: Services, user_id: int, session_id: int) -> dict[str, Any]:
    """One of the user's sessions as JSON, with its interactions, progress and place in the queue."""
    with services.database.orm_read() as db:
        session = conversations.owned(db, user_id, session_id, load=True)
        return _as_shown(services, conversations.session_json(
            db, session, grace=float(services.settings["NO_RUNNER_GRACE_SECONDS"])))


def session_type(services: Services, user_id: int, session_id: int) -> SessionType:
    """What one of the user's sessions makes (text or images)."""
    with services.database.orm_read() as db:
        return conversations.owned(db, user_id, session_id).type


def page(services: Services, user_id: int, *, limit: int, before: int | None) -> dict[str, Any]:
    """A page of the user's sessions, newest first (see conversations.page)."""
    with services.database.orm_read() as db:
        found = conversations.page(db, user_id, limit=limit, before=before)
    for session in found["sessions"]:
        _as_shown(services, session)
    return found


def file_list(services: Services, user_id: int, session_id: int) -> list[dict[str, Any]]:
    """Every file of one of the user's sessions (uploads, outputs, adapters), oldest first."""
    with services.database.orm_read() as db:
        conversations.owned(db, user_id, session_id)
        return [files.file_json(row) for row in files.of_session(db, session_id)]


def open_file(services: Services, user_id: int, session_id: int, file_id: int) -> tuple[File, BinaryIO]:
    """A file of one of the user's sessions and its bytes, open for reading."""
    with services.database.orm_read() as db:
        row = files.owned(db, user_id, session_id, file_id)
    return row, services.store.open(row.path)


def event_feed(services: Services, user_id: int, session_id: int) -> Callable[..., Iterator[str]]:
    """How to follow one of the user's sessions: `feed(cursor, follow=...)` gives its Server-Sent Events.

    Everything after event id `cursor`, then (with `follow`) each event as it is stored. The session is
    checked now, so a caller reads its cursor only for a session the user may follow.
    """
    with services.database.orm_read() as db:
        conversations.owned(db, user_id, session_id)
    settings, intake = services.settings, services.scheduler.intake
    return functools.partial(feed.stream, services.database, intake.live, session_id, bus=intake.bus,
                             keepalive=settings["SSE_KEEPALIVE_SECONDS"], recheck=settings["RECHECK_SECONDS"],
                             text_every=settings["SSE_TEXT_SECONDS"],
                             grace=float(settings["NO_RUNNER_GRACE_SECONDS"]))


def replay_start(services: Services, task_id: int) -> int:
    """The event id a page follows a reply from: just before its first event (see events.before_first)."""
    with services.database.connect() as conn:
        return events.before_first(conn, task_id)
