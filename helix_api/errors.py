"""The one error root of the API, and the handlers that answer every error in the asker's language.

A program under /api gets `{"error", "message"}` JSON, an OpenAI client under /v1 gets OpenAI's error
shape, and a browser anywhere else gets the web app's HTML page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)


class HelixError(Exception):
    """Something went wrong."""

    status_code = 500
    code = "internal_error"
    # Whether a client should send the same request again; None leaves it to the client. Only the
    # OpenAI-compatible API says it (`x-should-retry`), as the official clients retry every 5xx.
    retryable: bool | None = None

    def __init__(self, message: str | None = None, *, field: str | None = None, **extra: Any) -> None:
        # The docstring is the default message, so each subclass documents itself.
        self.message = message or (self.__doc__ or "").strip()
        self.field = field
        self.extra = extra
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of this error."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        body.update(self.extra)
        return body


class BadRequest(HelixError):
    """The request is malformed."""

    status_code = 400
    code = "bad_request"


class InvalidField(BadRequest):
    """A field has a wrong value or type."""

    code = "invalid_field"


class UnknownMode(BadRequest):
    """Unknown mode."""

    code = "unknown_mode"


class UnknownType(BadRequest):
    """Unknown type."""

    code = "unknown_type"


class UnknownModel(BadRequest):
    """Unknown model."""

    code = "unknown_model"


class InvalidTrainingData(BadRequest):
    """The training data has problems; `problems` names each file and line."""

    code = "invalid_training_data"


class InvalidDocument(BadRequest):
    """A document cannot be added to a knowledge base; `problems` names each file."""

    code = "invalid_document"


class Unauthorized(HelixError):
    """Missing or unknown credentials: send `Authorization: Bearer <key>`."""

    status_code = 401
    code = "unauthorized"


class Forbidden(HelixError):
    """These credentials may not use this endpoint."""

    status_code = 403
    code = "forbidden"


class NotFound(HelixError):
    """Not found."""

    status_code = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """No such model (or not one of yours)."""

    code = "model_not_found"


class SessionNotFound(NotFound):
    """No such session."""


class TaskNotFound(NotFound):
    """No such task."""


class FileNotFound(NotFound):
    """No such file."""


class KnowledgeBaseNotFound(NotFound):
    """No such knowledge base."""


class Conflict(HelixError):
    """The request conflicts with the current state."""

    status_code = 409
    code = "conflict"


class LeaseLost(Conflict):
    """The lease token is stale, wrong or expired: this runner no longer holds the task."""

    code = "lease_lost"


class EventsGap(Conflict):
    """Events arrived whose earlier seqs are missing here (the API restarted, say): resend from `resend_from`."""

    code = "events_gap"


class TaskCancelled(Conflict):
    """The task was cancelled by its user: stop working on it."""

    code = "task_cancelled"


class SessionBusy(Conflict):
    """The previous message is still being answered: wait for it or cancel it."""

    code = "session_busy"


class NotReady(Conflict):
    """This session is not ready for that yet."""

    code = "not_ready"


class NotCancellable(Conflict):
    """Nothing in this session is queued or running."""

    code = "not_cancellable"


class ReplyCancelled(Conflict):
    """The task answering this request was cancelled before it finished."""

    code = "task_cancelled"
    retryable = False


class TooLarge(HelixError):
    """The request body is over the size limit."""

    status_code = 413
    code = "too_large"


class TooManyQueued(HelixError):
    """You have too many tasks queued: wait for some to start, then try again."""

    status_code = 429
    code = "too_many_queued"
    retryable = True
    # Seconds a client should wait before trying again (the Retry-After header).
    retry_after = 10


class SchemaOutOfDate(HelixError):
    """The database schema is behind the code: run `helix db upgrade`."""


class DatabaseUnavailable(HelixError):
    """The database cannot be reached just now: try again shortly."""

    status_code = 503
    code = "database_unavailable"
    retryable = True


# What a 503 asks clients to wait before trying again; runners back off on their own as well.
RETRY_AFTER_SECONDS = 2


def unavailable(err: Exception) -> DatabaseUnavailable | None:
    """The 503 for an error that means the database is out of reach (down, restarting, pool exhausted), else None."""
    from sqlalchemy import exc  # the error root stays importable without the API's extras

    if isinstance(err, exc.OperationalError | exc.InterfaceError | exc.TimeoutError) or (
            isinstance(err, exc.DBAPIError) and err.connection_invalidated):
        return DatabaseUnavailable()
    return None


def database_down(err: Exception, database: Any) -> DatabaseUnavailable | None:
    """`unavailable(err)`, telling `database` (the app's) so that it logs the outage once, not per request."""
    outage = unavailable(err)
    if outage is not None:
        database.went_down(err)
    return outage


# How much of a request's input an error message quotes back: enough to recognise it, never a whole body.
ECHO_CHARS = 60
# A cut looks back this far for a space or punctuation, so it does not fall mid-word.
_ECHO_LOOKBACK = 15
_BREAKS = " ,;:)]}"


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """`value` as an error message quotes the request's input: a string in quotes, anything else as JSON,
    cut at about `limit` characters with an ellipsis. Every message that echoes input quotes it through here."""
    if isinstance(value, str):
        text, quote = value, "'"
    else:
        try:
            text, quote = json.dumps(value, ensure_ascii=False, allow_nan=True), ""
        except (TypeError, ValueError):
            return type(value).__name__
    if len(text) > limit:
        cut = text[:limit]
        space = max(cut.rfind(c) for c in _BREAKS)
        if space >= limit - _ECHO_LOOKBACK:
            cut = cut[:space + 1]
        text = cut.rstrip() + "…"
    if not quote:
        return text
    # repr's escapes (a newline as \n, a quote inside) keep the message on one line and unambiguous.
    return repr(text)


class TaskFailed(HelixError):
    """The task answering this request failed."""

    code = "task_failed"
    retryable = False  # it already had its attempts: asking again would repeat the work, not fix it


class ReplyTimeout(HelixError):
    """No answer in time: the task was cancelled."""

    status_code = 504
    code = "timeout"
    retryable = False


# Capacity: a reply that nothing can serve.


class NoRunner(HelixError):
    """No runner serves this model: the request was cancelled."""

    status_code = 503
    code = "no_runner"
    retryable = False  # the fleet decides when a runner comes, not the client: asking again at once is no help


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}
# OpenAI's error types by status; anything else at or above 500 is a server_error.
_OPENAI_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
OPENAI_PREFIX = "/v1/"
API_PREFIX = "/api/"
# A browser's page titles by status; the rest are werkzeug's names for the status.
_PAGE_TITLES = {401: "Please sign in", 403: "Not allowed", 404: "Not found", 405: "Method not allowed",
                500: "Something went wrong", 503: "Try again shortly"}

# Renders the web app's error page: (status, title, message) -> a response. Given by the app factory,
# so this module needs nothing of the web app.
ErrorPage = Callable[[int, str, str], Any]


def _under(prefix: str) -> bool:
    return request.path.startswith(prefix) or request.path == prefix.rstrip("/")


def _is_openai() -> bool:
    return _under(OPENAI_PREFIX)


def wants_html() -> bool:
    """Whether the asker is a browser on a page outside the APIs: it prefers HTML to JSON, and the path
    is neither /api nor /v1, whose clients read JSON whatever they accept."""
    if _under(API_PREFIX) or _is_openai():
        return False
    return request.accept_mimetypes.best_match(("application/json", "text/html")) == "text/html"


def openai_error(status: int, message: str, code: str | None, param: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""
    type_ = "server_error" if status >= 500 else _OPENAI_TYPES.get(status, "invalid_request_error")
    if status == 401:
        code = "invalid_api_key"  # what OpenAI's clients and tools look for
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def _openai_response(status: int, body: dict[str, Any], retryable: bool | None = None,
                     headers: dict[str, str] | None = None):
    headers = dict(headers or {})
    if retryable is not None:
        headers["x-should-retry"] = "true" if retryable else "false"
    return jsonify(body), status, headers


def _openai_endpoints(app: Flask) -> str:
    """The /v1 endpoints this server has, for a message about one it has not (parametrised ones left out)."""
    paths = sorted({rule.rule for rule in app.url_map.iter_rules()
                    if rule.rule.startswith(OPENAI_PREFIX) and not rule.arguments})
    return ", ".join(paths[:-1]) + f" and {paths[-1]}" if len(paths) > 1 else "".join(paths)


def _http_message(app: Flask, err: HTTPException, status: int) -> str:
    """What an HTTP error says, naming the path and method where werkzeug's text is generic."""
    where = request.path if len(request.path) <= 200 else echo(request.path, 200)
    if status == 413:
        return f"The request body is over the limit of {app.config.get('MAX_CONTENT_LENGTH')} bytes."
    if status == 404 and _is_openai():
        # OpenAI's clients show this to a person: say the endpoint is missing here, not that a URL was mistyped.
        return f"{where} is not supported by this server (it serves {_openai_endpoints(app)})."
    if status == 404:
        return f"There is nothing at {where}."
    if status == 405:
        allowed = ", ".join(sorted(set(getattr(err, "valid_methods", None) or []) - {"HEAD", "OPTIONS"}))
        return f"{request.method} {where} is not supported" + (f"; it takes {allowed}." if allowed else ".")
    return err.description or err.name


def register_error_handlers(app: Flask, database: Any, error_page: ErrorPage | None = None) -> None:
    """Turn HelixError, HTTP errors and anything unexpected into an answer in the asker's language.

    Under /v1 (the OpenAI-compatible API) errors take OpenAI's shape, so its clients raise the right
    exception with the message; under /api they are `{"error", "message"}`; elsewhere a browser gets
    `error_page`'s HTML (and a program its JSON).
    """

    def _page(status: int, message: str, title: str | None = None, headers: dict[str, str] | None = None):
        response = error_page(status, title or _PAGE_TITLES.get(status, "Something is wrong"), message)
        return app.make_response(response), status, headers or {}

    def _html() -> bool:
        return error_page is not None and wants_html()

    @app.errorhandler(HelixError)
    def _helix(err: HelixError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if err.status_code == 503 else {}
        if getattr(err, "retry_after", None):
            headers["Retry-After"] = str(err.retry_after)
        if err.status_code >= 500 and err.status_code != 503:  # an outage is logged once, by the database
            logger.error("%s: %s", err.code, err.message)
        if _is_openai():
            return _openai_response(err.status_code, openai_error(err.status_code, err.message, err.code,
                                                                  err.field, **err.extra), err.retryable, headers)
        if _html():
            return _page(err.status_code, err.message, headers=headers)
        return jsonify(err.to_dict()), err.status_code, headers

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException):
        status = err.code or 500
        message = _http_message(app, err, status)
        code = _HTTP_CODES.get(status, "http_error")
        allowed = getattr(err, "valid_methods", None)
        headers = {"Allow": ", ".join(allowed)} if status == 405 and allowed else {}
        if _is_openai():
            return _openai_response(status, openai_error(status, message, code), headers=headers)
        if _html():
            return _page(status, message, _PAGE_TITLES.get(status, err.name), headers)
        return jsonify({"error": code, "message": message}), status, headers

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        outage = database_down(err, database)
        if outage is not None:
            return _helix(outage)
        logger.exception("unhandled error")
        if _is_openai():
            return _openai_response(500, openai_error(500, "Internal server error.", "internal_error"))
        if _html():
            return _page(500, "An unexpected error happened; it has been logged.")
        return jsonify({"error": "internal_error", "message": "Internal server error."}), 500
