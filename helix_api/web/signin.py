"""Signing in with an API key: the browser's signed cookie names the user and the key, re-checked per request.

No password is stored anywhere: a person signs in with a key from `helix users create NAME`. The
cookie (Flask's signed session: HttpOnly, SameSite=Lax, Secure with HELIX_COOKIE_SECURE) holds the
user id and the key's id, never the key; revoking the key signs out every browser that used it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from flask import flash, g, redirect, render_template, request, session, url_for

from helix_api.accounts.auth import RUNNER_TOKEN_PREFIX, key_owner, key_user
from helix_api.errors import Unauthorized
from helix_api.services import services
from helix_api.web import bp

logger = logging.getLogger(__name__)

_USER, _KEY, _SINCE = "user_id", "key_id", "signed_in_at"


@bp.before_request
def load_caller() -> None:
    """Put the signed-in user in `g.caller` (None when signed out); forget a browser whose key was revoked."""
    g.caller = None
    user_id, key_id, since = session.get(_USER), session.get(_KEY), session.get(_SINCE)
    if not isinstance(user_id, int) or not isinstance(key_id, int) or not isinstance(since, int | float):
        return
    # Flask re-signs the cookie on every response, so its own expiry slides; a sign-in lasts
    # SIGN_IN_HOURS from when it happened, however busy the browser has been since.
    svc = services()
    if time.time() - since > svc.settings["PERMANENT_SESSION_LIFETIME"].total_seconds():
        session.clear()
        return
    # One primary-key lookup per request, uncached, so a revoked key signs its browsers out at once.
    g.caller = key_user(svc.database, user_id, key_id)
    if g.caller is None:
        logger.info("user %s: key %s is revoked or gone, signing the browser out", user_id, key_id)
        session.clear()


def _here() -> str:
    return request.full_path.rstrip("?")


def safe_next(target: str | None) -> str:
    """`target` if it is a path on this site, else the session list: sign-in never sends anyone elsewhere.

    Control characters (CR/LF above all) fall back too: they have no place in a path, and a Location
    header cannot carry them.
    """
    if (target and target.startswith("/") and not target.startswith("//") and "\\" not in target
            and target.isprintable()):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("web.session_list")


def signed_in(view: Callable) -> Callable:
    """Decorate a page: a signed-out visitor is sent to sign in, and back here afterwards."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if g.caller is None:
            return redirect(url_for("web.signin", next=_here()))
        return view(*args, **kwargs)
    return wrapper


def signed_in_feed(view: Callable) -> Callable:
    """Decorate what a page's script fetches (events, state, files): 401 when signed out, no redirect."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if g.caller is None:
            raise Unauthorized("Sign in again: this browser is signed out.")
        return view(*args, **kwargs)
    return wrapper


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    """Sign in with an API key."""
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        if g.caller is not None:
            return redirect(target)
        return render_template("web/signin.html", next=target, errors={})
    secret = request.form.get("api_key", "").strip()
    found = key_owner(services().database, secret) if secret else None
    if found is None:
        if not secret:
            message = "Paste your API key (it starts with hx_)."
        elif secret.startswith(RUNNER_TOKEN_PREFIX):
            message = "That is a runner token: sign in with a user's API key (helix users create NAME)."
        else:
            message = "Unknown or revoked API key."
        return render_template("web/signin.html", next=target, errors={"api_key": message}), 400
    # A fresh cookie: nothing from before signing in (a CSRF token included) carries over.
    session.clear()
    session.permanent = True
    session[_USER], session[_KEY] = found
    session[_SINCE] = int(time.time())
    logger.info("user %s signed in to the web app with key %s", *found)
    return redirect(target)


@bp.post("/signout")
def signout():
    """Sign out this browser."""
    session.clear()
    flash("Signed out.")
    return redirect(url_for("web.signin"))
