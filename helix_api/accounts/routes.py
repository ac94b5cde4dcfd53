"""Usage API: what a user has used, per model or per day; an admin may ask for anyone's."""

from __future__ import annotations

from flask import Blueprint, g
from sqlalchemy import select

from helix_api.accounts import usage
from helix_api.accounts.auth import require_user
from helix_api.errors import Forbidden, InvalidField, NotFound, echo
from helix_api.models import User
from helix_api.schemas import usage as schemas
from helix_api.services import services
from helix_api.validation import query

bp = Blueprint("usage", __name__, url_prefix="/api/v1")


@bp.get("/usage")
@require_user
def show_usage():
    """The caller's usage (or, for an admin, `user`'s) from `from` to `to`, grouped by model or day."""
    args = query(schemas.UsageQuery)
    start, end = args.get("from"), args.get("to")
    if start is not None and end is not None and end <= start:
        raise InvalidField("Field 'to' must be after 'from'.", field="to")
    svc = services()
    database = svc.database
    user_id, name = g.caller.id, g.caller.name
    wanted = args.get("user")
    if wanted is not None and wanted != name:
        if not g.caller.is_admin:
            raise Forbidden("Only admins may read another user's usage.")
        with database.connect() as conn:
            user_id = conn.execute(select(User.id).where(User.name == wanted)).scalar()
        if user_id is None:
            raise NotFound(f"No user called {echo(wanted)}.")
        name = wanted
    return {"user": name, **usage.report(database, user_id, start=start, end=end,
                                         group_by=args.get("group_by", "model"), shown=svc.catalog.shown)}
