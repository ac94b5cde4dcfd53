"""The one HTTP client a runner talks to the API with."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import requests
from requests.adapters import DEFAULT_POOLSIZE, HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)

from runner.config import CLAIM_PATH, Kind, RetryPolicy
from runner.errors import ApiError, ApiGone, ApiUnavailable, refusal
from runner.messages import Claim

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
LONG_POLL_MARGIN = 10.0  # a long-poll reply may take `wait` seconds plus the API's own latency
# Worth another try: the API is restarting, overloaded or throttling us.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
FILE_TIMEOUT = 300.0  # between two chunks of a file: adapters and images are large, but never silent this long
CHUNK_BYTES = 1 << 20
TRANSIENT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
CONNECTIONS_PER_SLOT = 4  # a slot may poll, beat, post events and move a file all at once
MOST_WARM = 64  # adapter keys one poll may name (the API's limit): the most recently used go
T = TypeVar("T")
_log_retry = before_sleep_log(logger, logging.WARNING)


class ApiClient:
    """Worker endpoints of the Helix API, with timeouts always set and transient failures retried."""

    def __init__(
        self,
        api_url: str,
        token: str,
        runner_name: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        pool_size: int = DEFAULT_POOLSIZE,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.session = requests.Session()
        # Keep a connection for every thread that may call at once; past the pool's size, requests
        # opens a connection per call and throws it away.
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size))
        self.session.headers.update({"Authorization": f"Bearer {token}", "X-Helix-Runner": runner_name})
        self._backoff = wait_random_exponential(multiplier=self.retry.initial, max=self.retry.cap)
        # Set by stopping(): from then on an unreachable API is waited for `_grace` seconds at most.
        self._stopping = threading.Event()
        self._stopping_since = 0.0
        self._grace = 0.0
        self._gone = threading.Event()  # the grace ran out once: every later call gives up at once
        self._on_gone: Callable[[], None] | None = None

    def full_model_name(self, name: str) -> str:
        """The full name (hub id or path) of the model the API knows as `name`, an alias or a full name: what
        this runner loads. `name` itself where the API does not know it (a model served without being configured)."""
        try:
            response = self._request("GET", f"/api/v1/models/{quote(name, safe='')}")
        except ApiError as exc:
            if exc.status == 404:
                return name
            raise
        return response.json().get("full_name") or name

    def claim(self, mode: str, type: str, model_name: str, wait: float = 0,
              interrupt: threading.Event | None = None, *, warm: Sequence[str] = ()) -> Claim | None:
        """Take the next matching task, long-polling up to `wait` seconds; None when there is none.

        Setting `interrupt` ends the retries at once (with ApiUnavailable): a stopping runner has no
        reason to wait for the API to come back just to claim a task it would hand back.
        """
        claims = self.claim_kinds([Kind(mode, type, model_name)], 1, wait=wait, interrupt=interrupt, warm=warm)
        return claims[0] if claims else None

    def claim_many(self, mode: str, type: str, model_name: str, count: int, wait: float = 0,
                   interrupt: threading.Event | None = None, *, warm: Sequence[str] = ()) -> list[Claim]:
        """Take up to `count` matching tasks in one request (a runner's free slots), long-polling like claim()."""
        return self.claim_kinds([Kind(mode, type, model_name)], count, wait=wait, interrupt=interrupt,
                                warm=warm, batch=True)

    def claim_kinds(self, kinds: Sequence[Kind], count: int = 1, wait: float = 0,
                    interrupt: threading.Event | None = None, *, warm: Sequence[str] = (),
                    batch: bool | None = None) -> list[Claim]:
        """Take up to `count` tasks from any of the `kinds` queues in one poll, long-polling like claim().

        One kind is asked for as mode/type/model_name, as every API version reads it; several as repeated
        `kind=MODE:TYPE:MODEL`. `warm` are the keys of the adapters this runner holds in memory: the API
        hands it their tasks first (and holds them back from runners without them for a moment).
        `batch` (default: `count` > 1) asks with `max=` for the list shape of the answer.
        """
        params: list[tuple[str, str]] = []
        if len(kinds) == 1:
            (only,) = kinds
            params += [("mode", only.mode), ("type", only.type), ("model_name", only.model_name)]
        else:
            params += [("kind", kind.spelled) for kind in kinds]
        # The most recently used last in the cache's order: those are the ones worth naming.
        params += [("warm", key) for key in list(warm)[-MOST_WARM:]]
        if batch is None:
            batch = count > 1
        if batch:
            params.append(("max", str(count)))
        if wait:
            params.append(("wait", str(math.ceil(wait))))  # the API takes whole seconds
        response = self._request("GET", CLAIM_PATH, params=params, read_timeout=wait + LONG_POLL_MARGIN,
                                 interrupt=interrupt)
        if response.status_code == 204:
            return []
        try:
            body = response.json()
            if "tasks" not in body:  # the single-task shape: no `max`, or an API from before it
                return [Claim.from_json(body)]
            return [Claim.from_json(item) for item in body["tasks"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(response.status_code, "bad_response", f"unreadable claim reply: {exc!r}") from exc

    def register(self, profile: dict[str, Any]) -> None:
        """Tell the API what this runner is (runner.profile). One try, never retried here: the runner
        tries again before its next claim, so an API that is down never delays the claims."""
        self._send("POST", self.api_url + "/api/v1/worker/runners", json=profile,
                   timeout=(CONNECT_TIMEOUT, self.timeout))

    def heartbeat(self, task_id: int, lease_token: str, profile: dict[str, Any] | None = None) -> dict[str, Any]:
        """Renew the lease, with this runner's current profile when given; the reply says whether the user
        cancelled the task."""
        body: dict[str, Any] = {"lease_token": lease_token}
        if profile is not None:
            body["runner"] = profile
        return self._post(task_id, "heartbeat", body)

    def post_events(self, task_id: int, lease_token: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Store events (tokens, progress, logs); resending already stored seq numbers is harmless."""
        return self._post(task_id, "events", {"lease_token": lease_token, "events": events})

    def post_events_many(self, posts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events of several tasks (`{task_id, lease_token, events}` each) in one request; an answer each."""
        response = self._request("POST", "/api/v1/worker/events", json={"posts": posts})
        try:
            return list(response.json()["results"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(response.status_code, "bad_response", f"unreadable events reply: {exc!r}") from exc

    def complete(self, task_id: int, lease_token: str, result: dict[str, Any],
                 events: list[dict[str, Any]] | None = None, claim_next: bool = False) -> Claim | None:
        """Finish the task with its result, and the events not posted yet (stored once each, like posts).

        With `claim_next`, the same request claims this runner's next task: returned, or None when
        there was none. A retry after a lost answer gets the same task back, never a second one.
        """
        body: dict[str, Any] = {"lease_token": lease_token, "result": result}
        if events:
            body["events"] = events
        if claim_next:
            body["claim_next"] = True
        reply = self._post(task_id, "complete", body)
        try:
            return Claim.from_json(reply["next"]) if claim_next and reply.get("next") else None
        except (KeyError, TypeError) as exc:
            raise ApiError(200, "bad_response", f"unreadable next task in the complete reply: {exc!r}") from exc

    def fail(self, task_id: int, lease_token: str, error: str, retry: bool) -> dict[str, Any]:
        """Fail the task; with `retry` the API requeues it while it has attempts left."""
        return self._post(task_id, "fail", {"lease_token": lease_token, "error": error, "retry": retry})

    def release(self, task_id: int, lease_token: str) -> dict[str, Any]:
        """Hand the task back to the queue, attempt included (used when shutting down)."""
        return self._post(task_id, "release", {"lease_token": lease_token})

    def download(self, task_id: int, lease_token: str, file_id: int, dest: Path) -> str:
        """Stream a file of the task's session to `dest`; returns the SHA-256 the API stored for it."""
        path = f"{CLAIM_PATH}/{task_id}/files/{file_id}"

        def fetch() -> str:
            response = self._request("GET", path, headers={"X-Helix-Lease": lease_token}, stream=True,
                                     read_timeout=FILE_TIMEOUT)
            with response, dest.open("wb") as out:
                try:
                    for chunk in response.iter_content(CHUNK_BYTES):
                        out.write(chunk)
                except TRANSIENT_ERRORS as exc:
                    raise ApiUnavailable(f"GET {path}: cut off: {exc}") from exc
            return response.headers.get("X-Helix-SHA256", "")

        # A download cut off half-way starts again from the first byte.
        return self._with_retries(None, fetch)

    def upload(self, task_id: int, lease_token: str, source: Path, *, kind: str, name: str,
               content_type: str) -> dict[str, Any]:
        """Store a file the task produced (an output or an adapter); returns its file ref."""

        def send() -> requests.Response:
            with source.open("rb") as handle:  # reopened for every attempt: a retry resends it whole
                return self._send("POST", self.api_url + f"{CLAIM_PATH}/{task_id}/files",
                                  data={"lease_token": lease_token, "kind": kind},
                                  files={"file": (name, handle, content_type)},
                                  timeout=(CONNECT_TIMEOUT, FILE_TIMEOUT))

        return self._with_retries(None, send).json()["file"]

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def stopping(self, grace: float, on_gone: Callable[[], None] | None = None) -> None:
        """The runner is stopping: a call that cannot reach the API gives up `grace` seconds after the stop.

        Its last calls (a release, a complete) are worth a short wait, but not the minute of retries a
        running runner spends: a runner whose API went away first would otherwise hang on for 10-25 s.
        The first call to give up logs one line, calls `on_gone` and raises ApiGone; every later call
        raises it at once. Never blocks, so a signal handler may call it.
        """
        if not self._stopping.is_set():
            self._grace = grace
            self._on_gone = on_gone
            self._stopping_since = time.monotonic()
            self._stopping.set()

    def _post(self, task_id: int, action: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._request("POST", f"{CLAIM_PATH}/{task_id}/{action}", json=body)
        try:
            return response.json()
        except ValueError:
            return {}

    def _request(self, method: str, path: str, *, read_timeout: float | None = None,
                 interrupt: threading.Event | None = None, **kwargs: Any) -> requests.Response:
        timeout = (CONNECT_TIMEOUT, read_timeout or self.timeout)
        return self._with_retries(interrupt, self._send, method, self.api_url + path, timeout=timeout, **kwargs)

    def _with_retries(self, interrupt: threading.Event | None, call: Callable[..., T], *args: Any,
                      **kwargs: Any) -> T:
        """`call` retried while the API is unavailable; past a stopping runner's grace, ApiGone."""
        if self._gone.is_set():
            raise ApiGone("the API is gone (given up while stopping)")
        try:
            return self._retrying(interrupt)(call, *args, **kwargs)
        except ApiUnavailable as exc:
            if not self._stopping.is_set() or time.monotonic() - self._stopping_since < self._grace:
                raise
            if not self._gone.is_set():
                self._gone.set()
                if self._on_gone is not None:
                    self._on_gone()
                logger.warning("the API at %s has been unreachable for %.1fs while stopping: exiting without it "
                               "(tasks not handed back return to the queue when their leases run out): %s",
                               self.api_url, time.monotonic() - self._stopping_since, exc)
            raise ApiGone(f"the API is gone: {exc}") from exc

    def _retrying(self, interrupt: threading.Event | None) -> Retrying:
        stop = (stop_after_attempt(self.retry.attempts) | stop_after_delay(self.retry.max_delay)
                | self._past_grace)
        if interrupt is not None:
            stop = stop | stop_when_event_set(interrupt)
        return Retrying(
            retry=retry_if_exception_type(ApiUnavailable),
            wait=self._wait,
            stop=stop,
            sleep=interrupt.wait if interrupt else self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _past_grace(self, state: RetryCallState) -> bool:
        """A stop condition: the runner is stopping and its grace for an unreachable API has run out."""
        return self._stopping.is_set() and time.monotonic() - self._stopping_since >= self._grace

    def _sleep(self, seconds: float) -> None:
        """A backoff's sleep; a stop cuts it short, so the grace counts from the stop, not the backoff's end."""
        if self._stopping.is_set():
            time.sleep(seconds)  # _wait keeps it within the grace
        else:
            self._stopping.wait(seconds)

    def _before_sleep(self, state: RetryCallState) -> None:
        # While stopping, the retries within the grace stay quiet: giving up is said once, in one line.
        if not self._stopping.is_set():
            _log_retry(state)

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, url, **kwargs)
        except TRANSIENT_ERRORS as exc:
            raise ApiUnavailable(f"{method} {url}: {exc}") from exc
        if response.status_code in TRANSIENT_STATUSES:
            raise ApiUnavailable(f"{method} {url}: {response.status_code} {_message(response)}",
                                 status=response.status_code, retry_after=_retry_after(response))
        if response.status_code >= 400:
            raise refusal(response.status_code, *_error_body(response))
        return response

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, but never sooner than a 429's Retry-After (within the cap)."""
        delay = self._backoff(state)
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, ApiUnavailable) and error.retry_after:
            delay = max(delay, min(error.retry_after, self.retry.cap))
        if self._stopping.is_set():
            # The last try comes as the grace runs out, not a backoff after it.
            delay = min(delay, max(0.0, self._grace - (time.monotonic() - self._stopping_since)))
        return delay


def _error_body(response: requests.Response) -> tuple[str, str]:
    """The error code and message of a refusal's JSON body (or its text, when it has none)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return str(body.get("error") or ""), str(body.get("message") or response.reason or "")
    return "", response.text[:200] or str(response.reason or "")


def _message(response: requests.Response) -> str:
    code, message = _error_body(response)
    return f"{code}: {message}" if code else message


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None  # an HTTP date, or absent: backoff alone decides
