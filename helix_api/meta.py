"""What the API offers: its models, and a health check for load balancers."""

from __future__ import annotations

from flask import Blueprint

from .auth import require_user
from .services import services

bp = Blueprint("meta", __name__)


@bp.get("/api/v1/models")
@require_user
def models():
    """The models sessions may name."""
    return {"models": services().catalog.as_list()}


@bp.get("/healthz")
def health():
    """200 when the database answers."""
    services().database.ping()
    return {"status": "ok"}
