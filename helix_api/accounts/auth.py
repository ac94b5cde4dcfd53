"""Credentials: API keys for users, tokens for runners, and the checks every endpoint makes."""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from flask import g, request
from sqlalchemy import select, update
from sqlalchemy.orm import Session as DBSession

from helix_api.db import Database
from helix_api.errors import Forbidden, Unauthorized
from helix_api.models import ApiKey, RunnerToken, User, utcnow
from helix_api.services import services

USER_KEY_PREFIX = "hx_"
RUNNER_TOKEN_PREFIX = "hxr_"


@dataclass(frozen=True)
class Caller:
    """Who is asking: a user (by API key) or a runner (by runner token)."""

    kind: Literal["user", "runner"]
    id: int
    name: str
    is_admin: bool = False


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a key or token: they are random and long, so a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def create_user(db: DBSession, name: str, is_admin: bool = False) -> tuple[User, str]:
    """A new user with a first API key; returns the user and the key (shown once)."""
    user = User(name=name, is_admin=is_admin)
    db.add(user)
    db.flush()
    return user, create_api_key(db, user)


def create_api_key(db: DBSession, user: User) -> str:
    """A new API key for `user`; only its hash is stored."""
    key = _new_secret(USER_KEY_PREFIX)
    db.add(ApiKey(user_id=user.id, prefix=key[:10], key_hash=hash_secret(key)))
    return key


def create_runner_token(db: DBSession, name: str) -> str:
    """A new runner token; only its hash is stored."""
    token = _new_secret(RUNNER_TOKEN_PREFIX)
    db.add(RunnerToken(name=name, prefix=token[:10], token_hash=hash_secret(token)))
    return token


class _CallerCache:
    """Hash -> Caller (None: unknown) until an expiry, so a busy runner does not cost a query per request."""

    def __init__(self, max_size: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[str, tuple[float, Caller | None]] = {}
        self._lock = threading.Lock()
        self._max_size = max_size
        self._clock = clock

    def get(self, key: str) -> tuple[bool, Caller | None]:
        """(True, caller) while `key`'s entry is fresh; (False, None) when there is none."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            return False, None
        return True, entry[1]

    def put(self, key: str, caller: Caller | None, seconds: float) -> None:
        """Remember `caller` for `key` for `seconds`."""
        with self._lock:
            if len(self._entries) >= self._max_size:
                self._entries.clear()
            self._entries[key] = (self._clock() + seconds, caller)

    def forget(self, keys: list[str]) -> None:
        """Drop the entries of `keys`, so their next request looks them up again."""
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)


# One per process: each API process may trust a lookup for AUTH_CACHE_SECONDS. Only the /api and
# /v1 credentials go through it; the web sign-in check is uncached (see key_user).
_callers = _CallerCache()


def _lookup(database: Database, secret_hash: str, cache_seconds: float) -> Caller | None:
    hit, caller = _callers.get(secret_hash)
    if hit:
        return caller
    with database.orm_read() as db:
        row = db.execute(
            select(User.id, User.name, User.is_admin).join(ApiKey, ApiKey.user_id == User.id)
            .where(ApiKey.key_hash == secret_hash, ApiKey.revoked_at.is_(None))).first()
        if row is not None:
            caller = Caller("user", row.id, row.name, bool(row.is_admin))
        else:
            row = db.execute(select(RunnerToken.id, RunnerToken.name).where(
                RunnerToken.token_hash == secret_hash, RunnerToken.revoked_at.is_(None))).first()
            caller = Caller("runner", row.id, row.name) if row is not None else None
    if cache_seconds > 0:
        _callers.put(secret_hash, caller, cache_seconds)
    return caller


def revoke_api_keys(database: Database, prefix: str) -> int:
    """Revoke the live API keys starting with `prefix` (its first 10 characters); how many.

    This process forgets them at once; other API processes refuse them within AUTH_CACHE_SECONDS.
    """
    with database.orm_write() as db:
        hashes = list(db.scalars(update(ApiKey).where(ApiKey.prefix == prefix[:10], ApiKey.revoked_at.is_(None))
                                 .values(revoked_at=utcnow()).returning(ApiKey.key_hash)))
    _callers.forget(hashes)  # after the commit: a lookup meanwhile would have cached the key as live
    return len(hashes)


def key_owner(database: Database, secret: str) -> tuple[int, int] | None:
    """(user id, key id) of a live API key, or None."""
    with database.orm_read() as db:
        row = db.execute(select(ApiKey.user_id, ApiKey.id).where(
            ApiKey.key_hash == hash_secret(secret), ApiKey.revoked_at.is_(None))).first()
    return (row.user_id, row.id) if row is not None else None


def key_user(database: Database, user_id: int, key_id: int) -> Caller | None:
    """The user, if the key they signed in with is still theirs and not revoked (uncached)."""
    with database.orm_read() as db:
        row = db.execute(select(User.id, User.name, User.is_admin).join(ApiKey, ApiKey.user_id == User.id)
                         .where(ApiKey.id == key_id, User.id == user_id, ApiKey.revoked_at.is_(None))).first()
    return Caller("user", row.id, row.name, bool(row.is_admin)) if row is not None else None


def authenticate() -> Caller:
    """The caller named by the Authorization header, or 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("Missing credentials: send `Authorization: Bearer <API key or runner token>`.")
    svc = services()
    caller = _lookup(svc.database, hash_secret(secret.strip()), svc.settings["AUTH_CACHE_SECONDS"])
    if caller is None:
        raise Unauthorized("Unknown or revoked API key or runner token.")
    return caller


def require(kind: Literal["user", "runner"]) -> Callable:
    """Decorate a view so only a `kind` caller gets in; the caller is in `g.caller`."""
    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            caller = authenticate()
            if caller.kind != kind:
                wanted = "an API key" if kind == "user" else "a runner token"
                raise Forbidden(f"This endpoint needs {wanted}; a {caller.kind} credential was sent.")
            g.caller = caller
            return view(*args, **kwargs)
        return wrapper
    return decorator


require_user = require("user")
require_runner = require("runner")


def require_admin(view: Callable) -> Callable:
    """Decorate a view so only an admin user gets in (403 for other users)."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        caller = authenticate()
        if caller.kind != "user" or not caller.is_admin:
            raise Forbidden("This endpoint is for admins: create one with `helix users create NAME --admin`.")
        g.caller = caller
        return view(*args, **kwargs)
    return wrapper
