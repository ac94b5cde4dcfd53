"""Admin API: what the operators' page shows, as JSON, and the operators' settings of users and models."""

from __future__ import annotations

from flask import Blueprint

from helix_api.accounts import limits
from helix_api.accounts.auth import require_admin
from helix_api.errors import InvalidField
from helix_api.ops import overview
from helix_api.schemas import admin as schemas
from helix_api.services import services
from helix_api.tasks import reservations, runners
from helix_api.validation import json_body, query, query_number

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")
# reservations.model_name is VARCHAR(500), as every model name column.
_MODEL_NAME_MAX = 500


@bp.get("/overview")
@require_admin
def show_overview():
    """Runners seen (what each serves, last heard from, tasks held), queue depth per model, fine-tune
    reservations, recent failures."""
    query(schemas.Overview)
    limit = int(query_number("failures", 20, 1, 200))
    svc = services()
    return overview.overview(svc.database, failures=limit, gone_after=runners.gone_after(svc.settings))


@bp.get("/runners")
@require_admin
def list_runners():
    """Every runner seen: hardware, backend, kinds, pool, slots, adapters, version, last heard from, alive or gone."""
    svc = services()
    return {"runners": overview.runner_listing(svc.database, runners.gone_after(svc.settings))}


@bp.get("/users/<name>/limits")
@require_admin
def show_user_limits(name: str):
    """A user's own task limits, the operator's defaults, the limits that hold, and their tasks queued and running."""
    svc = services()
    return limits.read(svc.database, name, svc.policy.rules).to_json()


@bp.put("/users/<name>/limits")
@require_admin
def set_user_limits(name: str):
    """Set a user's own task limits (null: the operator's default; 0: no limit; a field left out: unchanged)."""
    body = json_body(schemas.UserLimits)
    svc = services()
    return limits.change(svc.database, name, svc.policy.rules, **body).to_json()


@bp.get("/reservations")
@require_admin
def list_reservations():
    """Every fine-tune reservation, with the live runners of its model's pool and a warning where it is larger."""
    return {"reservations": overview.reservation_listing(services().database)}


@bp.put("/reservations/<path:model>")
@require_admin
def reserve(model: str):
    """Keep N of the runners polling for a model's inference and fine-tuning free for fine-tuning (0 removes)."""
    count = json_body(schemas.ReservationSet)["runners"]
    svc = services()
    model_name = _model_name(model)
    reserved = reservations.reserve(svc.database, model_name, count)
    return reserved.to_json() if reserved else {"model_name": model_name, "runners": 0, "removed": True}


@bp.delete("/reservations/<path:model>")
@require_admin
def unreserve(model: str):
    """Remove a model's fine-tune reservation (`removed`: whether it had one)."""
    model_name = _model_name(model)
    return {"model_name": model_name, "runners": 0,
            "removed": reservations.remove(services().database, model_name)}


def _model_name(model: str) -> str:
    """A model named in a path, by its full name or alias, as its full name."""
    if len(model) > _MODEL_NAME_MAX:
        raise InvalidField(f"A model name is at most {_MODEL_NAME_MAX} characters.", field="model")
    return services().catalog.resolve(model)
