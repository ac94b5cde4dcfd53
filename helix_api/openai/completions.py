"""Answers of the OpenAI-compatible API: starting a request's task, waiting for its reply or streaming
it as OpenAI chunks, and the images it made.

A request of /v1 is one session with one task (see `conversations.create_from_messages`); this module
follows that task through its session's events, as `feed.stream` does, and shapes what it made the
way OpenAI's API does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from helix_api.db import Database
from helix_api.errors import (
    FileNotFound,
    NoRunner,
    NotCancellable,
    ReplyCancelled,
    ReplyTimeout,
    TaskFailed,
    openai_error,
)
from helix_api.knowledge.retrieval import RetrievalSettings
from helix_api.models import FINAL_INTERACTION_STATES, FINAL_TASK_STATUSES, File, InteractionState, Task, TaskStatus
from helix_api.openai.model_ids import Model
from helix_api.sessions import records as conversations
from helix_api.sessions import tool_calls as stored_calls
from helix_api.sessions.files import FileKind
from helix_api.streaming import feed
from helix_api.streaming.bus import NoBus, RedisBus
from helix_api.streaming.live import LiveReplies
from helix_api.tasks import estimates, scheduler
from helix_api.tasks.leases import LeasePolicy
from helix_api.tasks.notifier import session_topic

logger = logging.getLogger(__name__)

_TASKS = Task.__table__
_FINISH_REASONS = ("stop", "length", "tool_calls")


@dataclass(frozen=True)
class Request:
    """A task started for a /v1 request: where to follow it, and what to call it in the answer."""

    session_id: int
    task_id: int
    model: str
    created: int
    # The documents and chunks retrieval gave the model (None: the request named no knowledge base).
    sources: list[dict[str, Any]] | None = None

    @property
    def id(self) -> str:
        """The completion's id: the task's, so an operator finds it in SQL."""
        return f"chatcmpl-{self.task_id}"


def start(database: Database, policy: LeasePolicy, *, user_id: int, model: Model, requested: str,
          messages: list[dict[str, Any]], params: dict[str, Any], knowledge_bases: list[int] | None = None,
          knowledge: RetrievalSettings | None = None) -> Request:
    """Start the session of a /v1 request with its task queued; `requested` is the model id it named.

    With `knowledge_bases` (the user's, checked), the last message's turn retrieves from them.
    """
    session, task = conversations.create_from_messages(
        database, user_id=user_id, type_=model.type, model_name=model.name, messages=messages, params=params,
        policy=policy, adapter=model.adapter, knowledge_bases=knowledge_bases, knowledge=knowledge)
    return Request(session_id=session.id, task_id=task.id, model=requested,
                   created=int(session.created_at.timestamp()), sources=(task.input or {}).get("sources"))


def _task(database: Database, task_id: int) -> Any:
    with database.connect() as conn:
        return conn.execute(select(_TASKS).where(_TASKS.c.id == task_id)).one()


def _cancel(database: Database, request: Request, why: str) -> None:
    try:
        scheduler.cancel(database, request.session_id)
        logger.info("task %s: cancelled (%s)", request.task_id, why)
    except NotCancellable:  # it finished meanwhile
        pass
    except Exception:
        logger.exception("task %s: cancelling failed (%s)", request.task_id, why)


def _outcome_error(task: Any) -> TaskFailed | ReplyCancelled:
    if task.status == TaskStatus.CANCELLED:
        return ReplyCancelled(f"Task {task.id} was cancelled before it finished.")
    return TaskFailed(f"Task {task.id} {task.status.value}: {task.error or 'no error given'}")


def _no_runner(database: Database, request: Request, task: Any) -> NoRunner | None:
    """The error for a task still queued that no live runner serves, cancelled; None while one does."""
    with database.connect() as conn:
        if estimates.serves(conn, estimates.kind_of(task)):
            return None
    _cancel(database, request, "no runner serves its model")
    return NoRunner(f"No runner serves the model {task.model_name!r}: the request was cancelled. "
                    "Try again once a runner for it is up.")


def wait(database: Database, request: Request, *, timeout: float, recheck: float,
         grace: float | None = None) -> Any:
    """The task once it completed; the error that says why not when it failed, was cancelled or timed out.

    Woken by the session's events (every token post is one), re-checking every `recheck` seconds as
    other processes on SQLite send no wake-up. On timeout the task is cancelled: nobody waits for it.
    With `grace`, a task still queued after `grace` seconds that no live runner serves is cancelled and
    NoRunner raised: the caller hears at once rather than at the timeout.
    """
    started = time.monotonic()
    deadline = started + timeout
    with database.notifier.watch(session_topic(request.session_id)) as watch:
        while True:
            task = _task(database, request.task_id)
            if task.status in FINAL_TASK_STATUSES:
                break
            if (grace is not None and task.status == TaskStatus.QUEUED and time.monotonic() - started >= grace
                    and (missing := _no_runner(database, request, task)) is not None):
                task = _task(database, request.task_id)
                if task.status != TaskStatus.COMPLETE:  # a runner came and finished it meanwhile: answer it
                    raise missing
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _cancel(database, request, "timed out")
                was = task.status.value
                task = _task(database, request.task_id)
                if task.status == TaskStatus.COMPLETE:
                    break
                raise ReplyTimeout(f"No reply within {timeout:g} seconds: task {task.id} was still {was} "
                                   "and has been cancelled.")
            pause = min(recheck, remaining)
            if grace is not None and (to_grace := started + grace - time.monotonic()) > 0:
                pause = min(pause, to_grace)  # wake when the grace ends, to say no runner at once
            watch.wait(pause)
    if task.status != TaskStatus.COMPLETE:
        raise _outcome_error(task)
    return task


def images(database: Database, task: Any) -> list[File]:
    """The images a completed task's result names, in its order, that are still files of its reply."""
    ids = [i for i in (task.result or {}).get("files") or [] if isinstance(i, int)]
    with database.orm_read() as db:
        rows = {row.id: row for row in db.scalars(select(File).where(
            File.id.in_(ids), File.interaction_id == task.interaction_id))}
    return [rows[i] for i in ids if i in rows]


def output_image(database: Database, file_id: int) -> File:
    """An image a runner made for a reply, or FileNotFound once it is gone."""
    with database.orm_read() as db:
        row = db.get(File, file_id)
    if row is None or row.kind != FileKind.OUTPUT.value:
        raise FileNotFound(f"No image {file_id}: it was deleted.")
    return row


def usage(result: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage from a runner's result (zeros where a backend reports none)."""
    given = result.get("usage") if isinstance(result.get("usage"), dict) else {}
    prompt = int(given.get("prompt_tokens") or 0)
    completion = int(given.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(result: dict[str, Any]) -> str:
    """`stop`, `length` or `tool_calls`, as OpenAI names them; a reply that calls tools says `tool_calls`."""
    if tool_calls(result):
        return "tool_calls"
    reason = result.get("finish_reason")
    return reason if reason in _FINISH_REASONS else "stop"


def tool_calls(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A runner's `tool_calls` in OpenAI's shape, read as they are stored; [] when the reply made none."""
    return [stored_calls.as_message(call) for call in stored_calls.of_result(result)]


def _logprob(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": str(entry.get("token", "")), "logprob": float(entry.get("logprob", 0.0)),
            "bytes": entry.get("bytes")}


def logprobs(task: Any) -> dict[str, Any] | None:
    """`choices[0].logprobs` in OpenAI's shape from the runner's `logprobs`; None unless the request asked."""
    entries = (task.result or {}).get("logprobs")
    if not (task.params or {}).get("logprobs") or not isinstance(entries, list):
        return None
    return {"content": [_logprob(e) | {"top_logprobs": [_logprob(t) for t in e.get("top_logprobs") or []
                                                         if isinstance(t, dict)]}
                        for e in entries if isinstance(e, dict)]}


def chat_completion(request: Request, task: Any) -> dict[str, Any]:
    """A `chat.completion` from a completed task; a reply that only calls tools has `content` null."""
    result = task.result or {}
    calls = tool_calls(result)
    text = str(result.get("text") or "")
    message: dict[str, Any] = {"role": "assistant", "content": None if calls and not text else text}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": request.id, "object": "chat.completion", "created": request.created, "model": request.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(result),
                     "logprobs": logprobs(task)}],
        "usage": usage(result), "system_fingerprint": None,
    } | _sources(task)


def _sources(task: Any) -> dict[str, Any]:
    """`{"sources": [...]}` when the request drew on knowledge bases: an extra field clients may ignore."""
    found = (task.input or {}).get("sources")
    return {} if found is None else {"sources": found}


def _data(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class _Chunks:
    """`chat.completion.chunk`s of one request."""

    def __init__(self, request: Request, include_usage: bool) -> None:
        self.request = request
        self.include_usage = include_usage

    def chunk(self, delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None,
              logprobs: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.request.id, "object": "chat.completion.chunk", "created": self.request.created,
            "model": self.request.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            **(extra or {})}
        if self.include_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries it
        return _data(body)

    def usage(self, result: dict[str, Any]) -> str:
        return _data({"id": self.request.id, "object": "chat.completion.chunk", "created": self.request.created,
                      "model": self.request.model, "system_fingerprint": None, "choices": [],
                      "usage": usage(result)})


def _error(status: int, message: str, code: str) -> str:
    return _data(openai_error(status, message, code))


class _Text:
    """What a stream has sent, against what the current attempt has made.

    A requeued task starts its reply again from scratch: while the new attempt repeats what was sent
    nothing more goes out, and once it goes further only the rest does. An attempt that says something
    else cannot be taken back from the client: `diverged`.
    """

    def __init__(self) -> None:
        self.sent = ""
        self.attempt = ""
        self.diverged = False

    def restart(self) -> None:
        self.attempt = ""

    def add(self, text: str) -> str:
        """The part of the attempt's text, `text` added, that the client has not had yet."""
        self.attempt += text
        shorter, longer = sorted((self.sent, self.attempt), key=len)
        if not longer.startswith(shorter):
            self.diverged = True
            return ""
        new = self.attempt[len(self.sent):]
        self.sent = max(self.sent, self.attempt, key=len)
        return new


def stream_chat(database: Database, live: LiveReplies, request: Request, *, include_usage: bool, keepalive: float,
                recheck: float, bus: NoBus | RedisBus | None = None, text_every: float = 0.0,
                grace: float | None = None) -> Iterator[str]:
    """Server-Sent Events in OpenAI's chunk format, from the task's events until it ends.

    A client that goes away (the generator is closed) cancels the task, as does an error that ends
    the stream early: nobody will read its reply. With `grace`, a task that no live runner serves after
    `grace` seconds in the queue ends the stream with a `no_runner` error (and so is cancelled).
    """
    chunks = _Chunks(request, include_usage)
    text = _Text()
    ended = False
    # Looked at often enough to end the stream soon after the grace, and never more often than a recheck.
    outlook = None if grace is None else feed.Outlook(
        database, request.session_id, grace=grace,
        every=min(estimates.ESTIMATE_EVERY_SECONDS, max(grace / 2, recheck)))
    try:
        # Sources are known up front: the first chunk carries them, an extra field clients may ignore.
        extra = {} if request.sources is None else {"sources": request.sources}
        yield chunks.chunk({"role": "assistant", "content": ""}, extra=extra)
        for event in feed.feed(database, live, request.session_id, feed.Cursor(), follow=True, keepalive=keepalive,
                               recheck=recheck, bus=bus, text_every=text_every, outlook=outlook):
            if event is None:
                yield ": keepalive\n\n"  # a comment: keeps proxies from closing a quiet stream
            elif event.task_id != request.task_id:
                continue
            elif event.kind == "estimate":
                if event.data.get("phase") == estimates.NO_RUNNER:
                    logger.info("task %s: no runner serves %s; ending its stream", request.task_id, request.model)
                    error = NoRunner(f"No runner serves the model {request.model!r}: the request was cancelled. "
                                     "Try again once a runner for it is up.")
                    yield _error(error.status_code, error.message, error.code)
                    return  # not ended: the finally cancels the task
            elif event.kind == "token":
                new = text.add(str(event.data.get("text") or ""))
                if text.diverged:
                    logger.warning("task %s: a retried attempt diverged from the streamed text", request.task_id)
                    yield _error(500, "The task was retried after a failure and its new attempt differs from "
                                 "the text already streamed; ask again.", "retry_diverged")
                    return
                if new:
                    yield chunks.chunk({"content": new})
            elif event.kind == "state":
                state = event.data.get("state")
                if state == InteractionState.QUEUED:
                    text.restart()
                elif state in FINAL_INTERACTION_STATES:
                    ended = True
                    yield from _end(database, request, chunks, text)
                    return
    finally:
        if not ended:
            _cancel(database, request, "the stream ended early")


def _end(database: Database, request: Request, chunks: _Chunks, text: _Text) -> Iterator[str]:
    task = _task(database, request.task_id)
    if task.status != TaskStatus.COMPLETE:
        error = _outcome_error(task)
        yield _error(error.status_code, error.message, error.code)
        return
    result = task.result or {}
    final = str(result.get("text") or "")
    # Token events carry text only: the log probabilities travel whole with the end of the reply's text.
    scores = logprobs(task)
    # Tokens are all stored before the task completes; this only guards against a backend whose
    # result says more than it streamed.
    if final.startswith(text.sent) and len(final) > len(text.sent):
        yield chunks.chunk({"content": final[len(text.sent):]}, logprobs=scores)
        scores = None
    elif final != text.sent:
        logger.warning("task %s: the result's text differs from the streamed text", request.task_id)
    if scores is not None:
        yield chunks.chunk({"content": ""}, logprobs=scores)
    # Calls are never streamed as text (the runner holds them back): each goes out whole, as OpenAI's
    # first chunk of a call (id, name, empty arguments) and then its arguments.
    for index, call in enumerate(tool_calls(result)):
        function = call["function"]
        yield chunks.chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                            "function": {"name": function["name"], "arguments": ""}}]})
        yield chunks.chunk({"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]})
    yield chunks.chunk({}, finish_reason(result))
    if chunks.include_usage:
        yield chunks.usage(result)
    yield _data("[DONE]")
