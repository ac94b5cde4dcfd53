"""Sessions and their interactions: starting one, continuing it, and showing it to its owner."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.orm import Session as DBSession
from sqlalchemy.orm import selectinload

from helix_api.db import Database, Prepared, insert_row
from helix_api.errors import NotReady, SessionBusy, SessionNotFound
from helix_api.knowledge import retrieval
from helix_api.models import (
    ACTIVE_TASK_STATUSES,
    OPEN_TASK_STATUSES,
    Creator,
    File,
    Interaction,
    InteractionState,
    Mode,
    Session,
    SessionType,
    TaskStatus,
    utcnow,
)
from helix_api.params import Limits, check_params
from helix_api.sessions import files, tool_calls, training_data
from helix_api.sessions.files import FileKind
from helix_api.sessions.storage import FileStore, safe_name
from helix_api.tasks import estimates, queues, transitions
from helix_api.tasks.leases import LeasePolicy

# Prepared (db.Prepared): a new session's inserts are on the dispatch cycle's hot path.
_INSERT_SESSION = Prepared(insert_row(Session.__table__))
_INSERT_INTERACTION = Prepared(insert_row(Interaction.__table__))
# The same, taking only the columns given (the rest default): for the paths off the hot one.
_INSERT_SESSION_ANY = insert(Session.__table__).returning(*Session.__table__.c)
_INSERT_INTERACTION_ANY = insert(Interaction.__table__).returning(*Interaction.__table__.c)


def owned(db: DBSession, user_id: int, session_id: int, *, load: bool = False) -> Session:
    """The user's session; someone else's is as good as missing (404, not 403: ids leak nothing)."""
    stmt = select(Session).where(Session.id == session_id, Session.user_id == user_id)
    if load:
        turns = selectinload(Session.interactions)
        stmt = stmt.options(turns.selectinload(Interaction.task), turns.selectinload(Interaction.tool_calls))
    session = db.scalar(stmt)
    if session is None:
        raise SessionNotFound(f"No session {session_id}.")
    return session


def conversation(session: Session) -> list[dict[str, Any]]:
    """The chat so far as task input messages: each user message with its completed reply.

    A message whose reply failed or was cancelled is left out with it, so roles keep alternating
    as chat templates require; so is a fine-tune's turn (its upload and training summary), which
    taught the adapter and is no part of the chat that follows. A reply that called tools carries its
    calls, then a `tool` message for each call a result was sent for; the reply that followed those
    results (a /v1 chat's) comes next, with no user message between.
    """
    messages: list[dict[str, Any]] = []
    pending_user: Interaction | None = None
    after_calls = False
    for item in session.interactions:
        if item.creator == Creator.USER:
            pending_user = item
            continue
        if item.state != InteractionState.COMPLETE or (item.task is not None and item.task.mode != Mode.CREATE):
            continue
        if pending_user is not None:
            messages.append({"role": "user", "content": pending_user.message})
            pending_user = None
        elif not after_calls:
            continue
        messages.extend(_reply_messages(item))
        after_calls = bool(item.tool_calls)
    return messages


def _reply_messages(reply: Interaction) -> list[dict[str, Any]]:
    """A completed reply as the assistant's message, and the results of its tool calls as `tool` messages."""
    said: dict[str, Any] = {"role": "assistant", "content": reply.output}
    if not reply.tool_calls:
        return [said]
    said["tool_calls"] = [tool_calls.as_message(c) for c in reply.tool_calls]
    return [said, *({"role": "tool", "tool_call_id": c.call_id, "content": c.result}
                    for c in reply.tool_calls if c.result is not None)]


def _add_turn(db: DBSession | Connection, session: Any, user_id: int, message: str | None, params: dict[str, Any],
              priority: int, policy: LeasePolicy, history: list[dict[str, Any]],
              extra_input: dict[str, Any] | None = None, adapter: Any | None = None,
              knowledge: retrieval.RetrievalSettings | None = None) -> list[tuple]:
    """Store the user's message and a queued reply with its task; returns (interaction, task) pairs.

    `message` None: the reply follows tool results at the end of `history`, and there is no user turn.
    A session that names knowledge bases gets the chunks that best match the message (else the last user
    message) in its task's system message (with `knowledge`, the app's retrieval settings), and their
    list as `sources`.
    """
    now = utcnow()
    turns: list[tuple] = []
    if message is not None:
        turns.append((_INSERT_INTERACTION.one(db, {
            "session_id": session.id, "creator": Creator.USER, "message": message, "params": params,
            "state": InteractionState.COMPLETE, "output": "", "progress": None, "result": None, "error": None,
            "created_at": now, "finished_at": now}), None))
    reply = _INSERT_INTERACTION.one(db, {
        "session_id": session.id, "creator": Creator.ASSISTANT, "message": "", "params": params,
        "state": InteractionState.QUEUED, "output": "", "progress": None, "result": None, "error": None,
        "created_at": now, "finished_at": None})
    task_input: dict[str, Any] = {"messages": history if message is None
                                  else [*history, {"role": "user", "content": message}]}
    kb_ids = getattr(session, "knowledge_bases", None) or []
    asked = message if message is not None else next(
        (m["content"] for m in reversed(history) if m["role"] == "user"), None)
    if kb_ids and knowledge is not None and asked:
        grounding = retrieval.ground(db, kb_ids, asked, knowledge)
        task_input["messages"] = retrieval.with_context(task_input["messages"], grounding)
        task_input["sources"] = grounding.sources if grounding else []
    if session.type == SessionType.IMAGE:
        task_input["prompt"] = message
    if session.mode == Mode.CREATE:
        # Always set, so a runner can tell "no adapter" from "forgot to say": it never keeps one by accident.
        task_input["adapter"] = files.file_ref(adapter) if adapter is not None else None
    task_input.update(extra_input or {})
    task = transitions.enqueue(db, session_id=session.id, interaction_id=reply.id, user_id=user_id,
                          mode=session.mode, type_=session.type, model_name=session.model_name,
                          input=task_input, params=params, priority=priority,
                          max_attempts=policy.max_attempts, rules=policy.rules)
    return [*turns, (reply, task)]


def _insert_session(conn: Connection, *, user_id: int, name: str, mode: Mode, type_: SessionType,
                    model_name: str, knowledge_bases: list[int] | None = None) -> Any:
    now = utcnow()
    return _INSERT_SESSION.one(conn, {
        "user_id": user_id, "name": name[:200], "mode": mode, "type": type_, "model_name": model_name,
        "event_seq": 0, "knowledge_bases": knowledge_bases or [], "created_at": now, "updated_at": now})


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def create(database: Database, *, user_id: int, mode: Mode, type_: SessionType, model_name: str,
           message: str, params: dict[str, Any], name: str | None,
           policy: LeasePolicy, knowledge_bases: list[int] | None = None,
           knowledge: retrieval.RetrievalSettings | None = None) -> dict[str, Any]:
    """Start a session with its first message and queue the task that answers it; returns its JSON.

    `knowledge_bases` (ids the caller checked are the user's) are searched on every turn.
    """
    with database.transaction() as conn:
        session = _insert_session(conn, user_id=user_id, name=name or _first_line(message), mode=mode,
                                  type_=type_, model_name=model_name, knowledge_bases=knowledge_bases)
        turns = _add_turn(conn, session, user_id, message, params, queues.PRIORITY_NEW, policy, history=[],
                          knowledge=knowledge)
        # Shown from what is in hand: a new session has no files, and its one event is "queued".
        return _session_body(conn, session, turns, file_rows=[], event_seq=1)


def create_from_messages(database: Database, *, user_id: int, type_: SessionType, model_name: str,
                         messages: list[dict[str, Any]], params: dict[str, Any], policy: LeasePolicy,
                         adapter: Any | None = None, knowledge_bases: list[int] | None = None,
                         knowledge: retrieval.RetrievalSettings | None = None) -> tuple[Any, Any]:
    """Start a session from a whole chat (the OpenAI way) and queue the reply to its last message: the
    user's, or a `tool` message (the reply then follows the tool results, with no user turn of its own).

    Earlier user and assistant messages become completed interactions without a task, so the session
    reads as the chat it was; an assistant's tool calls become its `tool_calls` rows, each with the
    `result` a later `tool` message sent for it. System and tool messages are in the task's
    `input.messages` only, which is the whole list. Returns the session and task rows.
    """
    *earlier, last = messages
    asked = last["content"] if last["role"] == Creator.USER else None
    first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
    results = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
    with database.transaction() as conn:
        session = _insert_session(conn, user_id=user_id, name=_first_line(first_user) or "chat",
                                  mode=Mode.CREATE, type_=type_, model_name=model_name,
                                  knowledge_bases=knowledge_bases)
        now = utcnow()
        calls: list[dict[str, Any]] = []
        for past in earlier:
            if past["role"] not in (Creator.USER, Creator.ASSISTANT):
                continue
            said = past["role"] == Creator.USER
            stored = conn.execute(_INSERT_INTERACTION_ANY, {
                "session_id": session.id, "creator": Creator(past["role"]), "params": {},
                "message": past["content"] if said else "", "output": "" if said else past["content"],
                "state": InteractionState.COMPLETE, "created_at": now, "finished_at": now}).one()
            calls += [tool_calls.row(session_id=session.id, interaction_id=stored.id, position=position,
                                     call_id=call["id"], name=call["function"]["name"],
                                     arguments=call["function"]["arguments"], result=results.get(call["id"]), now=now)
                      for position, call in enumerate(past.get("tool_calls") or [])]
        tool_calls.write(conn, calls)
        turns = _add_turn(conn, session, user_id, asked, params, queues.PRIORITY_NEW, policy,
                          history=earlier if asked is not None else messages, adapter=adapter, knowledge=knowledge)
        return session, turns[-1][1]


def create_finetune(database: Database, store: FileStore, *, user_id: int, type_: SessionType,
                    model_name: str, message: str | None, params: dict[str, Any], name: str | None,
                    data: training_data.TextSet | training_data.ImageSet, uploads: list[Any],
                    policy: LeasePolicy, max_file_bytes: int, model_shown: str | None = None) -> dict[str, Any]:
    """Store checked training data and start a fine-tune session with its training task queued; its default
    name calls the model `model_shown` (what users see: never a path), else `model_name`."""
    saved: list[tuple[FileKind, str, Any, str]] = []  # (kind, name, blob, content type)
    try:
        for upload in uploads:
            upload.stream.seek(0)
            saved.append((FileKind.UPLOAD, safe_name(upload.filename or "upload"),
                          store.save(upload.stream, "uploads", upload.filename or "upload", max_file_bytes),
                          training_data.content_type(upload.filename or "")))
        if isinstance(data, training_data.TextSet):
            saved.append((FileKind.DATASET, "train.jsonl", store.save(data.jsonl, "uploads", "train.jsonl",
                                                                      max_file_bytes), "application/jsonl"))
            method = params.get("method") or "sft"
            label = model_shown or model_name
            summary = (f"Fine-tune {label} on {data.examples} examples" if method == "sft" else
                       f"Fine-tune {label} ({method}) on {data.examples} comparisons")
        else:
            summary = f"Fine-tune {model_shown or model_name} on {len(data.images)} captioned images"
        now = utcnow()
        with database.transaction() as conn:
            session = conn.execute(_INSERT_SESSION_ANY, {
                "user_id": user_id, "name": (name or summary)[:200], "mode": Mode.FINETUNE, "type": type_,
                "model_name": model_name, "event_seq": 0, "created_at": now, "updated_at": now}).one()
            rows = [files.add(conn, session_id=session.id, user_id=user_id, interaction_id=None, kind=kind,
                              name=file_name, blob=blob, content_type=content_type)
                    for kind, file_name, blob, content_type in saved]
            if isinstance(data, training_data.TextSet):
                extra = {"files": [files.file_ref(r) for r in rows if r.kind == FileKind.DATASET],
                         "examples": data.examples}
            else:
                extra = {"files": [files.file_ref(r) for r in rows if r.name in data.images],
                         "captions": data.captions}
            turns = _add_turn(conn, session, user_id, message or summary, params, queues.PRIORITY_NEW, policy,
                              history=[], extra_input=extra)
            conn.execute(update(File.__table__).where(File.id.in_([r.id for r in rows]))
                         .values(interaction_id=turns[0][0].id))
            stored = list(conn.execute(select(File.__table__).where(File.session_id == session.id)))
            return _session_body(conn, session, turns, file_rows=stored, event_seq=1)
    except BaseException:
        for _, _, blob, _ in saved:
            store.delete(blob.key)  # nothing half-stored: the rows rolled back, the bytes go too
        raise


def add_message(database: Database, *, user_id: int, session_id: int, message: str,
                params: dict[str, Any], policy: LeasePolicy, limits: Limits,
                knowledge: retrieval.RetrievalSettings | None = None) -> None:
    """Continue a session; its task goes ahead of tasks that start new sessions."""
    with database.orm_write() as db:
        session = owned(db, user_id, session_id, load=True)
        if session.mode == Mode.FINETUNE:
            raise NotReady(f"Session {session_id} is a fine-tune that has not completed: once training is done "
                           "it switches to inference with the new adapter and takes messages.")
        check_params(params, session.mode, session.type, limits)
        if any(i.task is not None and i.task.status in OPEN_TASK_STATUSES for i in session.interactions):
            raise SessionBusy(f"Session {session_id} is still answering its previous message: "
                              "wait for it (GET the session or follow its events) or cancel it.")
        _add_turn(db, session, user_id, message, params, queues.PRIORITY_CONTINUE, policy,
                  history=conversation(session), adapter=files.session_adapter(db, session.id), knowledge=knowledge)
        session.updated_at = utcnow()


def _interaction_json(db: DBSession | Connection, item: Any, task: Any, attached: list[Any],
                      grace: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": item.id, "creator": item.creator.value, "state": item.state.value,
        "message": item.message, "params": item.params, "output": item.output, "progress": item.progress,
        "files": [files.file_json(f) for f in attached],
        # Core rows of a turn just stored have no calls yet; ORM interactions bring theirs loaded.
        "tool_calls": [tool_calls.as_json(c) for c in getattr(item, "tool_calls", None) or []],
        "error": item.error, "created_at": item.created_at.isoformat(),
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
    }
    if task is not None:
        body["result"] = item.result
        body["task"] = {"id": task.id, "status": task.status.value, "attempt": task.attempt,
                        "max_attempts": task.max_attempts}
        if "sources" in (task.input or {}):
            body["sources"] = task.input["sources"]  # the documents and chunks retrieval gave the model
        body["phase"] = phase(task, item)
        if task.status == TaskStatus.QUEUED and grace is None:
            body["queue_position"] = queues.queue_position(db, task)
        elif task.status == TaskStatus.QUEUED:
            # Read, never written: the place in line, the estimated start, or that no runner serves it.
            body.update(estimates.estimate(db, task, grace=grace).to_json())
    return body


def phase(task: Any, reply: Any) -> str:
    """Where a reply is, in words for people: queued, loading, generating, training, or its end state.

    `loading` covers a runner that claimed the task and is fetching files, loading an adapter or
    encoding the prompt: nothing has come out yet.
    """
    if task.status == TaskStatus.QUEUED:
        return "queued"
    if task.status in ACTIVE_TASK_STATUSES:
        started = bool(reply.output) or bool(reply.progress)
        if not started:
            return "loading"
        return "training" if task.mode == Mode.FINETUNE else "generating"
    return reply.state.value


def _session_body(db: DBSession | Connection, session: Any, turns: list[tuple] | None, *,
                  file_rows: list[Any] | None, event_seq: int, grace: float | None = None) -> dict[str, Any]:
    """A session as JSON, from ORM objects or Core rows; `turns` are (interaction, task) pairs.

    With `grace` (NO_RUNNER_GRACE_SECONDS), a queued reply carries its estimate (estimates.py); without,
    as in the answer written in the enqueue's own transaction, its place in line alone.
    """
    body: dict[str, Any] = {
        "id": session.id, "name": session.name, "mode": session.mode.value, "type": session.type.value,
        "model_name": session.model_name, "knowledge_bases": list(session.knowledge_bases or []), "state": None,
        "created_at": session.created_at.isoformat(), "updated_at": session.updated_at.isoformat(),
        "last_event_seq": event_seq,
    }
    if turns is None:
        return body
    if turns:
        body["state"] = turns[-1][0].state.value
    if file_rows is None:
        file_rows = files.of_session(db, session.id)
    by_interaction: dict[int | None, list[File]] = {}
    for f in file_rows:
        by_interaction.setdefault(f.interaction_id, []).append(f)
    body["interactions"] = [_interaction_json(db, i, t, by_interaction.get(i.id, []), grace) for i, t in turns]
    return body


def session_json(db: DBSession, session: Session, *, detail: bool = True,
                 grace: float | None = None) -> dict[str, Any]:
    """A session as its owner sees it; with `detail`, every interaction too (a queued one's estimate with
    `grace`, the seconds after which a reply no live runner serves says `no_runner`)."""
    if detail:
        return _session_body(db, session, [(i, i.task) for i in session.interactions], file_rows=None,
                             event_seq=session.event_seq, grace=grace)
    body = _session_body(db, session, None, file_rows=None, event_seq=session.event_seq)
    body["state"] = session.interactions[-1].state.value if session.interactions else None
    return body


def page(db: DBSession, user_id: int, *, limit: int, before: int | None) -> dict[str, Any]:
    """The user's sessions, newest first; pass `next_before` back as `before` for the next page."""
    stmt = select(Session).where(Session.user_id == user_id)
    if before is not None:
        stmt = stmt.where(Session.id < before)
    rows = list(db.scalars(stmt.options(selectinload(Session.interactions))
                           .order_by(Session.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return {"sessions": [session_json(db, s, detail=False) for s in rows],
            "next_before": rows[-1].id if more else None}
