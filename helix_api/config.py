"""Settings: defaults in `Config`, then `HELIX_`-prefixed environment variables, then overrides."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any


class Config:
    """Defaults for every setting; each can be set as `HELIX_<NAME>` in the environment."""

    # Where the embedded SQLite database (and, later, files) live.
    DATA_DIR = str(Path.home() / ".helix")
    # Empty means SQLite at DATA_DIR/helix.db; `postgresql+psycopg://...` for production.
    DATABASE_URL = ""
    # Only the embedded default upgrades itself; a shared database is upgraded by an operator.
    AUTO_UPGRADE: bool | None = None
    MAX_CONTENT_LENGTH = 1024 * 1024
    LEASE_SECONDS = 30.0
    HEARTBEAT_SECONDS = 10.0
    MAX_ATTEMPTS = 3
    MAX_WAIT_SECONDS = 30.0
    # How often a long-poll or event stream re-reads even without a wake-up: a safety net, as wake-ups
    # are immediate within a process and across processes on PostgreSQL (LISTEN/NOTIFY). Lower it
    # when running several API processes on one SQLite file, which have no way to wake each other.
    RECHECK_SECONDS = 2.0
    # How often expired leases are swept back to the queue (per API process, lazily).
    REAP_SECONDS = 1.0
    SSE_KEEPALIVE_SECONDS = 15.0
    # A follower gets a streaming reply's new text at most this often (the first piece at once): a
    # fast reply costs one write per interval, not one per runner post. Well under what a reader sees.
    SSE_TEXT_SECONDS = 0.025
    # Runners' tokens live in memory and reach the reply's row in SQL at most this often per task.
    FLUSH_SECONDS = 0.25
    # Carries tokens between API processes and replicas (redis://...): followers anywhere see each
    # token at once. Without it, followers in another process see the text as it is flushed.
    BUS_URL = ""
    # Replicas of one deployment share it; deployments sharing one Redis must not.
    BUS_NAMESPACE = "helix"
    PAGE_SIZE = 20
    MAX_PAGE_SIZE = 100
    # Extra models an operator offers besides the defaults: "text:/models/my-llm,image:org/sdxl-x".
    MODELS = ""
    # Caps on what a task may ask for (400 naming the param beyond them).
    MAX_NEW_TOKENS = 4096
    MAX_IMAGE_SIDE = 2048
    MAX_STEPS = 150
    MAX_IMAGES = 4
    MAX_TRAIN_STEPS = 100_000
    # Caps on one JSON Schema (a response_format's, a tool's parameters): its size as JSON, and how deep
    # its objects and arrays nest. Every schema is compiled when a request comes in; these keep that cheap.
    MAX_SCHEMA_BYTES = 65536
    MAX_SCHEMA_DEPTH = 32
    # Params a custom backend takes beyond the built-in ones, comma-separated (passed through unchecked).
    EXTRA_PARAMS = ""
    # Files: where they live (empty: DATA_DIR/files), and how big they may be. Uploads and adapters
    # are far larger than JSON bodies, so their requests get their own limit.
    FILES_DIR = ""
    MAX_FILE_BYTES = 2 * 1024**3
    MAX_UPLOAD_BYTES = 4 * 1024**3
    # Training data checked before anything is queued.
    MIN_TEXT_EXAMPLES = 10
    MIN_TRAINING_IMAGES = 3
    MAX_TRAINING_IMAGE_BYTES = 20 * 1024**2
    MAX_TRAINING_IMAGE_SIDE = 4096
    # Comparisons (prompt, chosen, rejected) a `dpo` or `reward_model` fine-tune needs at least.
    MIN_COMPARISONS = 10
    # Knowledge bases (retrieval): how documents are cut into chunks, how many chunks (and characters)
    # a turn carries to the model, and how big one document may be.
    KNOWLEDGE_CHUNK_CHARS = 1000
    KNOWLEDGE_CHUNK_OVERLAP = 150
    KNOWLEDGE_TOP_K = 4
    KNOWLEDGE_MAX_CONTEXT_CHARS = 4000
    KNOWLEDGE_MAX_DOCUMENT_BYTES = 5 * 1024**2
    # Candidates one `POST /api/v1/sessions/<id>/score` may send, and how long it waits for the runner.
    MAX_SCORE_CANDIDATES = 16
    SCORE_WAIT_SECONDS = 300.0
    # Signs the web app's session cookies and the time-limited image links of /v1/images. Every API
    # replica must share it; empty means a random key kept in DATA_DIR/secret_key (one machine only).
    SECRET_KEY = ""
    # Send cookies over HTTPS only: set it wherever the web app is served over HTTPS.
    COOKIE_SECURE = False
    # How long an API process trusts an API key or runner token it has looked up: a key revoked by
    # another process is refused within this many seconds (0: looked up on every request). Browsers
    # signed in with a key are checked on every request whatever this says.
    AUTH_CACHE_SECONDS = 5.0
    # How long a signed-in browser stays signed in, and how long an image link from /v1/images works.
    SIGN_IN_HOURS = 12.0
    IMAGE_URL_SECONDS = 3600.0
    # /metrics is off the public API: served on this extra address of `helix serve` ("127.0.0.1:9464"),
    # and/or to scrapers that send `Authorization: Bearer <METRICS_TOKEN>`. Neither set: no /metrics.
    METRICS_BIND = ""
    METRICS_TOKEN = ""
    # How long a /v1 request that does not stream waits for its reply (then 504, and the task is cancelled).
    OPENAI_WAIT_SECONDS = 600.0
    # --- The fleet's scheduling rules (see notes.md "Scheduling rules"); each off at 0 -------------------
    # A task whose adapter a live runner with a free slot holds waits for that runner this long (jittered
    # up to twice as long) before any runner of the base model may take it. 0: first come, first served.
    WARM_WAIT_SECONDS = 1.0
    # Within a priority class, the next task goes to the user with the fewest tasks running. 0: FIFO.
    FAIR_SHARE = True
    # A new session queued longer than this is served before continue work (0: never).
    AGEING_SECONDS = 30.0
    # Per-user limits (operator defaults; `helix users limits` overrides one user's in SQL). 0: none. The
    # queued limit is far above a batch: it stops one runaway client from filling the queue for everyone.
    MAX_QUEUED_PER_USER = 10_000
    MAX_RUNNING_PER_USER = 0
    # A non-streamed /v1 request for a model no live runner serves fails after this many seconds.
    NO_RUNNER_GRACE_SECONDS = 10.0
    # The wait an autoscaler should aim for: helix_runners_wanted is sized so queued work starts within it.
    TARGET_WAIT_SECONDS = 30.0


def _coerce(raw: str, default: Any) -> Any:
    if isinstance(default, bool) or default is None:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def load_settings(environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Resolve every setting from the defaults, the environment and the overrides."""
    environ = os.environ if environ is None else environ
    settings: dict[str, Any] = {}
    for name in dir(Config):
        if not name.isupper():
            continue
        value = getattr(Config, name)
        env_value = environ.get(f"HELIX_{name}")
        if env_value is not None:
            value = _coerce(env_value, value)
        settings[name] = value
    settings.update(overrides or {})
    if not settings["DATABASE_URL"]:
        path = Path(settings["DATA_DIR"]) / "helix.db"
        settings["DATABASE_URL"] = f"sqlite:///{path}"
        if settings["AUTO_UPGRADE"] is None:
            settings["AUTO_UPGRADE"] = True
    if settings["AUTO_UPGRADE"] is None:
        settings["AUTO_UPGRADE"] = False
    if not settings["FILES_DIR"]:
        settings["FILES_DIR"] = str(Path(settings["DATA_DIR"]) / "files")
    if not settings["SECRET_KEY"]:
        settings["SECRET_KEY"] = _local_secret(Path(settings["DATA_DIR"]) / "secret_key")
    # Flask's own names for the cookie settings.
    settings["SESSION_COOKIE_NAME"] = "helix_session"
    settings["SESSION_COOKIE_HTTPONLY"] = True
    settings["SESSION_COOKIE_SAMESITE"] = "Lax"
    settings["SESSION_COOKIE_SECURE"] = bool(settings["COOKIE_SECURE"])
    settings["PERMANENT_SESSION_LIFETIME"] = timedelta(hours=float(settings["SIGN_IN_HOURS"]))
    return settings


def _local_secret(path: Path) -> str:
    """A random key made once and kept beside the embedded database, readable by its owner only."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key
