"""What the API offers: its models, and a health check for load balancers."""

from __future__ import annotations

import os
from pathlib import Path

from flask import Blueprint, current_app

from helix_api.accounts.auth import authenticate, require_user
from helix_api.catalog import is_path
from helix_api.errors import RETRY_AFTER_SECONDS, ModelNotFound, database_down, echo
from helix_api.schemas.openapi import document
from helix_api.services import Services, services

bp = Blueprint("meta", __name__)


@bp.get("/api/v1/models")
@require_user
def models():
    """The models sessions may name."""
    return {"models": services().catalog.as_list()}


@bp.get("/api/v1/models/<path:name>")
def model(name: str):
    """One model, named by its alias or full name. A runner gets its full name even when that is a path:
    it loads the weights by it, so a runner may be pointed at a model by its alias."""
    caller = authenticate()  # users and runners alike
    catalog = services().catalog
    spec = catalog.find(name)
    if spec is None:
        raise ModelNotFound(f"No model called {echo(name)}; offered: {', '.join(catalog.names())}.", field="name")
    shown_full = spec.name if caller.kind == "runner" or not is_path(spec.name) else None
    return {"name": spec.shown, "type": spec.type, "alias": spec.alias, "full_name": shown_full}


@bp.get("/api/v1/openapi.json")
def openapi():
    """This API's OpenAPI 3.1 document: every route under /api and /v1, with the schemas of what each reads."""
    return document(current_app, services().limits)


def dependencies(svc: Services) -> dict[str, str]:
    """Each dependency of the API (`database`, `files`) and `ok` or why it is down."""
    state = {"database": "ok", "files": "ok"}
    try:
        svc.database.ping()
    except Exception as err:
        if database_down(err, svc.database) is None:
            raise
        state["database"] = str(getattr(err, "orig", None) or err).strip().splitlines()[0][:200]
    # The store makes its directories as it writes: what must exist is the first one of them that does.
    root = Path(svc.settings["FILES_DIR"]).absolute()
    existing = next((p for p in (root, *root.parents) if p.exists()), root)
    if not os.access(existing, os.W_OK):
        state["files"] = f"{existing} is not writable"
    return state


@bp.get("/healthz")
def health():
    """200 when every dependency answers; 503 naming those that do not."""
    state = dependencies(services())
    down = sorted(name for name, value in state.items() if value != "ok")
    if down:
        return ({"status": "unavailable", "down": down, **state}, 503,
                {"Retry-After": str(RETRY_AFTER_SECONDS)})
    return {"status": "ok", **state}
