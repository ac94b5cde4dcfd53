"""The one error root of the API and the handler that turns every error into JSON."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)


class HelixError(Exception):
    """Something went wrong."""

    status_code = 500
    code = "internal_error"

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


class SessionNotFound(NotFound):
    """No such session."""


class TaskNotFound(NotFound):
    """No such task."""


class FileNotFound(NotFound):
    """No such file."""


class Conflict(HelixError):
    """The request conflicts with the current state."""

    status_code = 409
    code = "conflict"


class LeaseLost(Conflict):
    """The lease token is stale, wrong or expired: this runner no longer holds the task."""

    code = "lease_lost"


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


class TooLarge(HelixError):
    """The request body is over the size limit."""

    status_code = 413
    code = "too_large"


class SchemaOutOfDate(HelixError):
    """The database schema is behind the code: run `helix db upgrade`."""


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def register_error_handlers(app: Flask) -> None:
    """Turn HelixError, HTTP errors and anything unexpected into `{"error", "message"}` JSON."""

    @app.errorhandler(HelixError)
    def _helix(err: HelixError):
        if err.status_code >= 500:
            logger.error("%s: %s", err.code, err.message)
        return jsonify(err.to_dict()), err.status_code

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException):
        status = err.code or 500
        message = err.description or err.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"The request body is over the limit of {limit} bytes."
        return jsonify({"error": _HTTP_CODES.get(status, "http_error"), "message": message}), status

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        logger.exception("unhandled error")
        return jsonify({"error": "internal_error", "message": "Internal server error."}), 500
