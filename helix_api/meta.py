"""What the API offers: its models, and a health check for load balancers."""

from __future__ import annotations

from flask import Blueprint, current_app
from sqlalchemy import text

from .auth import require_user
from .db import get_db

bp = Blueprint("meta", __name__)


@bp.get("/api/v1/models")
@require_user
def models():
    """The models sessions may name."""
    return {"models": current_app.extensions["helix_catalog"].as_list()}


@bp.get("/healthz")
def health():
    """200 when the database answers."""
    with get_db().read() as db:
        db.execute(text("SELECT 1"))
    return {"status": "ok"}
