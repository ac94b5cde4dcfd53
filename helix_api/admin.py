"""Admin API: what the operators' page shows, as JSON."""

from __future__ import annotations

from flask import Blueprint

from . import overview
from .auth import require_admin
from .schemas import admin as schemas
from .services import services
from .validation import query, query_number

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")


@bp.get("/overview")
@require_admin
def show_overview():
    """Runners seen (what each serves, last heard from, tasks held), queue depth per model, recent failures."""
    query(schemas.Overview)
    limit = int(query_number("failures", 20, 1, 200))
    return overview.overview(services().database, failures=limit)
