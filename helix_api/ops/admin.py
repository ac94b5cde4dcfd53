"""Admin API: what the operators' page shows, as JSON."""

from __future__ import annotations

from flask import Blueprint

from helix_api.accounts.auth import require_admin
from helix_api.ops import overview
from helix_api.schemas import admin as schemas
from helix_api.services import services
from helix_api.tasks import runners
from helix_api.validation import query, query_number

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")


@bp.get("/overview")
@require_admin
def show_overview():
    """Runners seen (what each serves, last heard from, tasks held), queue depth per model, recent failures."""
    query(schemas.Overview)
    limit = int(query_number("failures", 20, 1, 200))
    svc = services()
    return overview.overview(svc.database, failures=limit, gone_after=runners.gone_after(svc.settings))


@bp.get("/runners")
@require_admin
def list_runners():
    """Every runner seen: hardware, backend, kinds, slots, adapters, version, last heard from, alive or gone."""
    svc = services()
    return {"runners": overview.runner_listing(svc.database, runners.gone_after(svc.settings))}
