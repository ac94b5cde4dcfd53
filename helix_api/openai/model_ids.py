"""The models of the OpenAI-compatible API: what /v1/models lists, and what a request's model id names.

An id is a configured model, a model a live runner serves for inference, or `ft:<base model>:<session
id>`, one of the caller's completed fine-tunes (its base model with the fine-tune's adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session as DBSession

from helix_api.catalog import Catalog
from helix_api.db import Database
from helix_api.errors import ModelNotFound, echo
from helix_api.models import Mode, Session, SessionType
from helix_api.params import REWARD_MODEL
from helix_api.sessions import files
from helix_api.tasks import runners

FT_PREFIX = "ft:"


@dataclass(frozen=True)
class Model:
    """What a /v1 model id names: a base model of one type, with a fine-tune's adapter or none."""

    name: str
    type: SessionType
    adapter: Any | None = None


def _offered(conn: Connection, catalog: Catalog) -> dict[str, tuple[str, str, bool]]:
    """id -> (full name, type, served): the configured models and those a live runner serves for inference,
    each under the name users see (its alias where it has one)."""
    offered = {catalog.shown(m.name): (m.name, m.type, False) for m in catalog.specs()}
    for mode, type_, name in runners.served_models(conn):
        if mode == Mode.CREATE.value:
            offered[catalog.shown(name)] = (name, type_, True)
    return offered


def _fine_tunes(db: DBSession, user_id: int) -> list[Any]:
    """The user's sessions with a completed adapter, oldest first."""
    return list(db.execute(select(Session.id, Session.model_name, Session.type, Session.created_at)
                           .where(Session.user_id == user_id, Session.id.in_(files.sessions_with_adapters()))
                           .order_by(Session.id)))


def _model_json(id_: str, type_: str, *, owned_by: str, created: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "object": "model", "created": created, "owned_by": owned_by, "helix_type": type_, **extra}


def listing(database: Database, catalog: Catalog, *, user_id: int, user_name: str) -> list[dict[str, Any]]:
    """The models a user may name, OpenAI-style: configured and served ones by name, then their fine-tunes."""
    with database.orm_read() as db:
        data = [_model_json(id_, type_, owned_by="helix", helix_served=served)
                for id_, (_, type_, served) in sorted(_offered(db.connection(), catalog).items())]
        data += [_model_json(f"{FT_PREFIX}{catalog.shown(row.model_name)}:{row.id}", row.type.value,
                             owned_by=user_name, created=int(row.created_at.timestamp()),
                             helix_base_model=catalog.shown(row.model_name), helix_session_id=row.id)
                 for row in _fine_tunes(db, user_id)
                 if files.adapter_method(db, row.id) != REWARD_MODEL]  # a reward model scores, it does not chat
    return data


def listed_id(catalog: Catalog, model: str) -> str:
    """The id /v1/models lists for a model named by id, alias or full name (`ft:` ids too)."""
    if model.startswith(FT_PREFIX):
        base, sep, session_id = model[len(FT_PREFIX):].rpartition(":")
        return f"{FT_PREFIX}{catalog.shown(catalog.resolve(base))}{sep}{session_id}" if sep else model
    return catalog.shown(catalog.resolve(model))


def resolve(database: Database, catalog: Catalog, *, user_id: int, model: str, type_: SessionType) -> Model:
    """The model a request names (by id, alias or full name), or 404 model_not_found; `ft:<base>:<session>` is
    one of the user's fine-tunes, its base named either way too."""
    with database.orm_read() as db:
        if model.startswith(FT_PREFIX):
            base, _, session_id = model[len(FT_PREFIX):].rpartition(":")
            # Bounded, so an absurd id is a 404 rather than an integer the database cannot take.
            session = db.get(Session, int(session_id)) if session_id.isdigit() and len(session_id) < 19 else None
            adapter = files.session_adapter(db, session.id) if session is not None else None
            if (adapter is None or session.user_id != user_id or session.model_name != catalog.resolve(base)
                    or session.type != type_ or files.adapter_method(db, session.id) == REWARD_MODEL):
                raise ModelNotFound(f"No {type_.value} fine-tune {echo(model)} of yours: its id is "
                                    f"ft:<base model>:<session id> of a completed fine-tune session "
                                    "(GET /v1/models).", field="model")
            return Model(session.model_name, type_, adapter)
        offered = _offered(db.connection(), catalog)
    by_full_name = {full: id_ for id_, (full, _, _) in offered.items()}
    id_ = model if model in offered else by_full_name.get(catalog.resolve(model))
    if id_ is None or offered[id_][1] != type_.value:
        names = sorted(n for n, (_, t, _) in offered.items() if t == type_.value)
        raise ModelNotFound(f"The model {echo(model)} does not exist as a {type_.value} model here; offered: "
                            f"{', '.join(names)} (and your ft: fine-tunes).", field="model")
    return Model(offered[id_][0], type_)
