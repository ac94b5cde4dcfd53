"""`/metrics` for Prometheus, off the public API: on the operator's own bind address, or behind a token.

With HELIX_METRICS_BIND (`helix serve` listens there too) only requests that arrive on that address
reach `/metrics`, and that address serves nothing else. With HELIX_METRICS_TOKEN a scraper may also
send `Authorization: Bearer <token>` on the public address. Otherwise `/metrics` is a 404 like any
unknown path. Every request's time is observed here too, by endpoint group.
"""

from __future__ import annotations

import hmac
import time

from flask import Blueprint, Flask, Response, g, request

from helix_api.errors import NotFound
from helix_api.ops import metrics
from helix_api.services import services

bp = Blueprint("metrics", __name__)

# Endpoints that wait by design get their own group, so they do not drown the latency of the rest.
_GROUPS = {"worker.claim": "worker_poll", "sessions.session_events": "events", "web.session_events": "events"}


def _port_of(bind: str) -> int | None:
    host, _, port = bind.rpartition(":")
    return int(port) if host and port.isdigit() else None


def _on_metrics_bind() -> bool:
    """Whether this request came in on HELIX_METRICS_BIND: the socket it arrived on, not a header, says so."""
    port = _port_of(services().settings["METRICS_BIND"])
    sock = request.environ.get("gunicorn.socket")
    if port is None or sock is None:
        return False
    try:
        return sock.getsockname()[1] == port
    except OSError:
        return False


def _has_token() -> bool:
    token = services().settings["METRICS_TOKEN"]
    sent = request.headers.get("Authorization", "")
    return bool(token) and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())


@bp.get("/metrics")
def scrape():
    """Every metric in Prometheus' text format, for the operator's scraper."""
    if not (_on_metrics_bind() or _has_token()):
        raise NotFound("No such page.")
    svc = services()
    return Response(metrics.exposition(svc.database, float(svc.settings["TARGET_WAIT_SECONDS"])),
                    content_type=metrics.CONTENT_TYPE)


def _start() -> None:
    g.metrics_started = time.perf_counter()
    if request.endpoint != "metrics.scrape" and _on_metrics_bind():
        raise NotFound("The metrics address serves /metrics only.")


def _finish(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    if started is not None and request.endpoint != "metrics.scrape":
        group = _GROUPS.get(request.endpoint or "", request.blueprint or "other")
        metrics.request_done(group, request.method, response.status_code, time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    """Serve /metrics and time every request of `app`."""
    app.register_blueprint(bp)
    app.before_request(_start)
    app.after_request(_finish)
