"""The application factory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider
from werkzeug.routing import IntegerConverter

from helix_api import web
from helix_api.accounts.routes import bp as usage_bp
from helix_api.config import load_settings
from helix_api.db import Database
from helix_api.errors import register_error_handlers
from helix_api.knowledge.routes import bp as knowledge_bp
from helix_api.openai.routes import bp as openai_bp
from helix_api.ops import admin, capacity, meta, schema_version, scrape
from helix_api.ops.unread_body import DrainUnreadBody
from helix_api.schemas.base import INT32_MAX
from helix_api.services import Services
from helix_api.sessions.routes import bp as sessions_bp
from helix_api.tasks.routes import bp as worker_bp

logger = logging.getLogger(__name__)


class FastJSON(DefaultJSONProvider):
    """Flask's JSON with orjson underneath: every view's answer is serialised here, runners' hot
    paths included, and orjson takes a fraction of the stdlib's time. What orjson does not know
    (dates, as Flask writes them, and anything else) goes to Flask's own `default`."""

    _OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs:
            return super().dumps(obj, **kwargs)
        return orjson.dumps(obj, default=self.default, option=self._OPTIONS).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return super().loads(s, **kwargs) if kwargs else orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj, default=self.default, option=self._OPTIONS),
                                        mimetype=self.mimetype)


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
    app.json = FastJSON(app)
    app.json.sort_keys = False
    app.url_map.converters["int"] = IdConverter

    database = Database()
    database.init_app(app)
    schema_version.ensure_current(database.engine, app.config["DATABASE_URL"], app.config["AUTO_UPGRADE"])
    database.listen()

    Services.from_settings(app.config, database).init_app(app)

    register_error_handlers(app, database, web.error_page)
    # CSRF tokens are checked by the web blueprint's own forms only: bearer-token JSON clients send none.
    app.config.update(WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=None)
    web.csrf.init_app(app)
    for blueprint in (sessions_bp, knowledge_bp, worker_bp, meta.bp, admin.bp, capacity.bp, openai_bp, usage_bp,
                      web.bp):
        app.register_blueprint(blueprint)
    scrape.init_app(app)
    # A refused request's unread body is read before its answer, so the answer arrives (ops/unread_body.py).
    app.wsgi_app = DrainUnreadBody(app.wsgi_app)  # type: ignore[method-assign]
    logger.info("Helix API on %s (%s)", database.engine.url.render_as_string(), database.dialect)
    return app
