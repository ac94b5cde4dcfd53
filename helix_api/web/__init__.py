"""The web app: server-rendered pages for people, on the same functions the JSON API calls.

A browser signs in with an API key and is then known by a signed cookie. Only this blueprint reads
that cookie, and every POST it takes carries a CSRF token; nothing under /api/v1 accepts cookies.
"""

from __future__ import annotations

import logging

from flask import Blueprint, g, make_response, render_template, request
from flask_wtf.csrf import CSRFProtect
from werkzeug.exceptions import HTTPException

from helix_api.errors import RETRY_AFTER_SECONDS, HelixError, database_down
from helix_api.services import services
from helix_api.validation import allow_uploads

logger = logging.getLogger(__name__)

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static",
               static_url_path="/assets")
# Bound by the app factory with WTF_CSRF_CHECK_DEFAULT off: only this blueprint's forms are checked,
# so bearer-token clients of the JSON API never need a token.
csrf = CSRFProtect()

# Forms that take files get the upload limit before anything reads the body (the CSRF check does).
UPLOAD_ENDPOINTS = {"web.new_finetune"}


@bp.before_request
def _check_form() -> None:
    if request.endpoint in UPLOAD_ENDPOINTS:
        allow_uploads(services().settings["MAX_UPLOAD_BYTES"])
    if request.method == "POST":
        csrf.protect()  # a missing or wrong token is a CSRFError: a 400 page


@bp.after_request
def _harden(response):
    # Pages load only their own script and stylesheet, are never framed, and files are never sniffed
    # into something a browser would run: an uploaded file cannot act as a page of this site.
    response.headers.setdefault("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def error_page(status: int, title: str, message: str):
    """An HTML error page with `status`, hardened like every page; the app's handlers show it to browsers
    on any path outside the APIs, so it works outside this blueprint's requests too."""
    if "caller" not in g:
        # Outside the blueprint nobody has looked at the cookie yet: a signed-in visitor keeps the nav.
        try:
            signin.load_caller()
        except Exception:  # the page must render even when the database is what failed
            logger.exception("could not read the signed-in user for an error page")
            g.caller = None
    page = render_template("web/error.html", status=status, title=title, message=message)
    return _harden(make_response(page, status))


@bp.errorhandler(HelixError)
def _helix_error(err: HelixError):
    if err.status_code >= 500:
        logger.error("%s: %s", err.code, err.message)
    titles = {401: "Please sign in", 403: "Not allowed", 404: "Not found"}
    return error_page(err.status_code, titles.get(err.status_code, "Something is wrong"), err.message)


@bp.errorhandler(HTTPException)
def _http_error(err: HTTPException):
    status = err.code or 500
    message = err.description or err.name
    if status == 413:
        message = f"The upload is over the limit of {request.max_content_length} bytes."
    return error_page(status, err.name, message)


@bp.errorhandler(Exception)
def _unexpected(err: Exception):
    outage = database_down(err, services().database)
    if outage is not None:
        page = error_page(503, "Try again shortly", outage.message)
        page.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return page
    logger.exception("unhandled error in the web app")
    return error_page(500, "Something went wrong", "An unexpected error happened; it has been logged.")


from helix_api.web import docs, replies, signin, text, views  # noqa: E402,F401  (they add their routes and filters to `bp`)
