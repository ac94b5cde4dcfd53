"""The application factory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.routing import IntegerConverter

from helix_api import web
from helix_api.accounts.routes import bp as usage_bp
from helix_api.config import load_settings
from helix_api.db import Database
from helix_api.errors import register_error_handlers
from helix_api.knowledge.routes import bp as knowledge_bp
from helix_api.openai.routes import bp as openai_bp
from helix_api.ops import admin, meta, schema_version, scrape
from helix_api.ops.unread_body import DrainUnreadBody
from helix_api.schemas.base import INT32_MAX
from helix_api.services import Services
from helix_api.sessions.routes import bp as sessions_bp
from helix_api.tasks.routes import bp as worker_bp

logger = logging.getLogger(__name__)


class IdConverter(IntegerConverter):
    """`<int:...>` in a route, up to what an id column holds: a bigger one matches no route (404), never
    reaching the database, where PostgreSQL would refuse it."""

    def __init__(self, map: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", INT32_MAX)
        super().__init__(map, *args, **kwargs)


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Build the API: settings from Config, then HELIX_* environment variables, then `overrides`."""
    app = Flask(__name__)
    app.config.update(load_settings(overrides=overrides))
    app.json.sort_keys = False
    app.url_map.converters["int"] = IdConverter

    database = Database()
    database.init_app(app)
    schema_version.ensure_current(database.engine, app.config["DATABASE_URL"], app.config["AUTO_UPGRADE"])
    database.listen()

    Services.from_settings(app.config, database).init_app(app)

    register_error_handlers(app, database)
    # CSRF tokens are checked by the web blueprint's own forms only: bearer-token JSON clients send none.
    app.config.update(WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=None)
    web.csrf.init_app(app)
    for blueprint in (sessions_bp, knowledge_bp, worker_bp, meta.bp, admin.bp, openai_bp, usage_bp, web.bp):
        app.register_blueprint(blueprint)
    scrape.init_app(app)
    # A refused request's unread body is read before its answer, so the answer arrives (ops/unread_body.py).
    app.wsgi_app = DrainUnreadBody(app.wsgi_app)  # type: ignore[method-assign]
    logger.info("Helix API on %s (%s)", database.engine.url.render_as_string(), database.dialect)
    return app
