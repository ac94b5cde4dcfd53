"""Capacity API: per kind of task, the work waiting and running, the live fleet, and the runners wanted.

The figures are estimates.py's, read from SQL as the request comes (the same as `helix_runners_wanted`
on /metrics), for admins and for an autoscaler that reads JSON rather than Prometheus.
"""

from __future__ import annotations

import logging

from flask import Blueprint

from helix_api.accounts.auth import require_admin
from helix_api.services import services
from helix_api.tasks import estimates

logger = logging.getLogger(__name__)

bp = Blueprint("capacity", __name__, url_prefix="/api/v1/admin")


@bp.get("/capacity")
@require_admin
def show_capacity():
    """Per (mode, type, model): queued, running, live runners, slots, free slots, service seconds, runners wanted."""
    svc = services()
    target = float(svc.settings["TARGET_WAIT_SECONDS"])
    with svc.database.connect() as conn:
        shops = estimates.shops(conn)
    return {"target_wait_seconds": target, "service_window_seconds": estimates.SERVICE_WINDOW_SECONDS,
            "kinds": [shop.to_json(target) for shop in shops]}
