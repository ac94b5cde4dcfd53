"""Scores from a reward model: a completed `reward_model` fine-tune rates candidate replies to a prompt.

`POST /api/v1/sessions/<id>/score` adds a turn to the fine-tune's session (the prompt as the user's
message, the scores as the reply) whose task has a kind of its own, mode `score`: a runner started
with `--mode score` (the `reward` backend) loads the base model with a one-label score head once,
applies the session's adapter and answers `{"scores": [...]}`, one per candidate, higher is better.
The request waits for that task as a /v1 request waits for its reply.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import insert

from helix_api.db import Database
from helix_api.errors import InvalidField, NotReady, SessionBusy
from helix_api.models import OPEN_TASK_STATUSES, Creator, Interaction, InteractionState, Mode, utcnow
from helix_api.openai import completions
from helix_api.params import REWARD_MODEL
from helix_api.sessions import files
from helix_api.sessions import records as conversations
from helix_api.tasks import queues, transitions
from helix_api.tasks.leases import LeasePolicy

logger = logging.getLogger(__name__)

_INSERT_INTERACTION = insert(Interaction.__table__).returning(*Interaction.__table__.c)


def check_request(prompt: Any, candidates: Any, max_candidates: int) -> tuple[str, list[str]]:
    """The prompt and candidates of a score request, or InvalidField naming what is wrong."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidField("Field 'prompt' must be a non-empty string.", field="prompt")
    if not isinstance(candidates, list) or not 1 <= len(candidates) <= max_candidates:
        raise InvalidField(f"Field 'candidates' must be a list of 1 to {max_candidates} replies.", field="candidates")
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, str) or not candidate.strip():
            raise InvalidField(f"candidates[{index}] must be a non-empty string.", field=f"candidates[{index}]")
    return prompt, candidates


def start(database: Database, policy: LeasePolicy, *, user_id: int, session_id: int, prompt: str,
          candidates: list[str]) -> completions.Request:
    """Queue the score task of one of the user's completed reward-model sessions; where to wait for it."""
    with database.orm_write() as db:
        session = conversations.owned(db, user_id, session_id, load=True)
        if session.mode != Mode.CREATE or files.adapter_method(db, session_id) != REWARD_MODEL:
            raise NotReady(f"Session {session_id} is not a completed reward-model fine-tune: train one with "
                           "params.method=reward_model on comparisons, then score with it.")
        if any(i.task is not None and i.task.status in OPEN_TASK_STATUSES for i in session.interactions):
            raise SessionBusy(f"Session {session_id} is still busy with its previous request.")
        adapter = files.session_adapter(db, session_id)
        now = utcnow()
        db.execute(_INSERT_INTERACTION, {
            "session_id": session_id, "creator": Creator.USER, "message": prompt, "params": {},
            "state": InteractionState.COMPLETE, "output": "", "created_at": now, "finished_at": now})
        reply = db.execute(_INSERT_INTERACTION, {
            "session_id": session_id, "creator": Creator.ASSISTANT, "message": "", "params": {},
            "state": InteractionState.QUEUED, "output": "", "created_at": now, "finished_at": None}).one()
        task = transitions.enqueue(db, session_id=session_id, interaction_id=reply.id, user_id=user_id, mode=Mode.SCORE,
                              type_=session.type, model_name=session.model_name,
                              input={"prompt": prompt, "candidates": candidates, "adapter": files.file_ref(adapter)},
                              params={}, priority=queues.PRIORITY_CONTINUE, max_attempts=policy.max_attempts,
                              rules=policy.rules)
        session.updated_at = now
        return completions.Request(session_id=session_id, task_id=task.id, model=session.model_name,
                                   created=int(now.timestamp()))


def scores_of(task: Any, count: int) -> list[float]:
    """The scores a completed score task answered, one per candidate."""
    scores = (task.result or {}).get("scores")
    if not isinstance(scores, list) or len(scores) != count:
        raise InvalidField(f"Task {task.id} answered no score per candidate.", field="result.scores")
    return [float(s) for s in scores]


def answer(request: completions.Request, task: Any, candidates: list[str]) -> dict[str, Any]:
    """The JSON answer of a score request."""
    scores = scores_of(task, len(candidates))
    best = max(range(len(scores)), key=scores.__getitem__)
    return {"session_id": request.session_id, "task_id": request.task_id, "scores": scores, "best": best}
