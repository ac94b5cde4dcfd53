"""Admin API: what the operators' page shows, as JSON."""

from __future__ import annotations

from flask import Blueprint

from helix_api.accounts.auth import require_admin
from helix_api.ops import overview
from helix_api.schemas import admin as schemas
from helix_api.services import services
from helix_api.validation import query, query_number

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")


@bp.get("/overview")
@require_admin
def show_overview():
    """Runners seen (what each serves, last heard from, tasks held), queue depth per model, recent failures."""
    query(schemas.Overview)
    limit = int(query_number("failures", 20, 1, 200))
    return overview.overview(services().database, failures=limit)
