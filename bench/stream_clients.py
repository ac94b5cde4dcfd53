"""The streaming benchmark's clients: runner processes that post token events, follower processes that read SSE.

The process entry points are module-level functions: they run in spawned processes. Runners speak
HTTP/1.1 keep-alive through `bench.helix_clients.Http`, followers read their streams through
`bench.sse` off a bare socket, so the benchmark's own CPU stays a small share of the machine. Times
are `time.monotonic()` (CLOCK_MONOTONIC: one clock for every process on the machine), so a token's
lag is the follower's receive time minus the runner's send time.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import selectors
import threading
import time
from typing import Any

from bench import sse
from bench.helix_clients import CLAIM_PATH, Http, claim_path

logger = logging.getLogger(__name__)

EVENTS_PATH = "/api/v1/worker/events"
TOKEN_WIDTH = 5  # every token has this many characters, so a text offset names its token
MAX_TOKENS = 36**3  # three base-36 digits per token index
END_STATES = frozenset({"complete", "error", "cancelled", "failed"})
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def token(stream: int, index: int) -> str:
    """Token `index` of stream `stream`: a session tag, the index in base 36, a space (5 characters).

    Each stream's text differs from its neighbours', so a token delivered to the wrong follower, a
    gap or a repeat all make a follower's text differ from its runner's.
    """
    digits = _DIGITS[index // 1296 % 36] + _DIGITS[index // 36 % 36] + _DIGITS[index % 36]
    return f"{_DIGITS[stream % 36]}{digits} "


def full_text(stream: int, tokens: int) -> str:
    """The whole reply a runner streams for `stream`."""
    return "".join(token(stream, i) for i in range(tokens))


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


# runners


class _Stream:
    """One claimed task being streamed: its lease, next token and seq, and when each post was sent."""

    def __init__(self, task: dict[str, Any], lease: dict[str, Any]) -> None:
        self.task_id: int = task["id"]
        self.session_id: int = task["session_id"]
        self.lease_token: str = lease["token"]
        self.heartbeat_seconds: float = lease.get("heartbeat_seconds", 10.0)
        self.next_token = 0
        self.sent: list[float] = []  # post k carried tokens [k * per_post, (k + 1) * per_post)
        self.error = ""

    def events(self, per_post: int, tokens: int) -> list[dict[str, Any]]:
        """The next post's token events (seq starts at 1 for the attempt)."""
        end = min(self.next_token + per_post, tokens)
        out = [{"seq": i + 1, "kind": "token", "text": token(self.session_id, i)}
               for i in range(self.next_token, end)]
        self.next_token = end
        return out


def _claim(client: Http, model: str, count: int, deadline: float) -> list[_Stream]:
    streams: list[_Stream] = []
    while len(streams) < count and time.monotonic() < deadline:
        status, body = client.request("GET", claim_path(model, 2))
        if status == 200:
            streams.append(_Stream(body["task"], body["lease"]))
        elif status != 204:
            raise RuntimeError(f"claim answered {status}: {body}")
    return streams


def _post(client: Http, streams: list[_Stream], per_post: int, tokens: int) -> tuple[int, int]:
    """One events post carrying the next tokens of each of `streams`; (tokens stored, errors)."""
    posts = [{"task_id": s.task_id, "lease_token": s.lease_token, "events": s.events(per_post, tokens)}
             for s in streams]
    sent = time.monotonic()
    for s in streams:
        s.sent.append(sent)
    status, body = client.request("POST", EVENTS_PATH, {"posts": posts})
    if status != 200:
        for s in streams:
            s.error = f"events post answered {status}: {str(body)[:200]}"
        return 0, len(streams)
    stored = errors = 0
    by_task = {s.task_id: s for s in streams}
    for result, post in zip(body["results"], posts, strict=True):
        if "error" in result or result.get("cancelled"):
            by_task[result["task_id"]].error = f"{result.get('error', 'cancelled')}: {result.get('message', '')}"
            errors += 1
        else:
            stored += len(post["events"])
    return stored, errors


def _complete(client: Http, s: _Stream, tokens: int) -> bool:
    status, body = client.request("POST", f"{CLAIM_PATH}/{s.task_id}/complete", {
        "lease_token": s.lease_token,
        "result": {"text": full_text(s.session_id, tokens), "finish_reason": "length",
                   "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}}})
    if status != 200:
        s.error = f"complete answered {status}: {str(body)[:200]}"
    return status == 200


def _heartbeats(cfg: dict[str, Any], streams: list[_Stream], done: threading.Event) -> None:
    """Renew every lease while the streams run, as a real runner's control thread does."""
    client = Http(cfg["host"], cfg["port"], cfg["token"], runner_name=cfg["name"])
    period = min(s.heartbeat_seconds for s in streams)
    while not done.wait(period):
        for s in streams:
            try:
                client.request("POST", f"{CLAIM_PATH}/{s.task_id}/heartbeat", {"lease_token": s.lease_token})
            except (OSError, http.client.HTTPException) as exc:
                logger.warning("task %s: heartbeat failed: %r", s.task_id, exc)
    client.close()


def _stream_loop(cfg: dict[str, Any], streams: list[_Stream], go: Any, totals: dict[str, Any]) -> None:
    """Post the next tokens of `streams` together, as fast as the API answers, then complete each."""
    client = Http(cfg["host"], cfg["port"], cfg["token"], runner_name=cfg["name"])
    client.connect()
    tokens, per_post = cfg["tokens"], cfg["per_post"]
    go.wait()
    stored = errors = posts = 0
    live = list(streams)
    try:
        while live:
            n, e = _post(client, live, per_post, tokens)
            stored, errors, posts = stored + n, errors + e, posts + 1
            live = [s for s in live if not s.error and s.next_token < tokens]
        last_post = time.monotonic()
        completed = sum(_complete(client, s, tokens) for s in streams if not s.error)
    except (OSError, http.client.HTTPException) as exc:
        logger.warning("%s: %r", cfg["name"], exc)
        errors += 1
        last_post, completed = time.monotonic(), 0
    client.close()
    with totals["lock"]:
        totals["stored"] += stored
        totals["errors"] += errors
        totals["posts"] += posts
        totals["completed"] += completed
        totals["last_post"] = max(totals["last_post"], last_post)


def runner_process(cfg: dict[str, Any], go: Any, out: Any) -> None:
    """A runner holding `cfg['streams']` claimed tasks, posting their tokens until each has `cfg['tokens']`.

    `cfg['grouped']`: one thread posts every stream's next tokens in one request (a runner with
    group commit); otherwise each stream has its own thread and posts alone (one stream per post).
    """
    client = Http(cfg["host"], cfg["port"], cfg["token"], runner_name=cfg["name"])
    try:
        streams = _claim(client, cfg["model"], cfg["streams"], time.monotonic() + 60)
    except Exception as exc:
        out.put(("runner_failed", cfg["name"], repr(exc)))
        return
    client.close()
    out.put(("claimed", os.getpid(), [(s.task_id, s.session_id) for s in streams]))
    totals = {"lock": threading.Lock(), "stored": 0, "errors": 0, "posts": 0, "completed": 0, "last_post": 0.0}
    groups = [streams] if cfg["grouped"] else [[s] for s in streams]
    workers = [threading.Thread(target=_stream_loop, args=(cfg, g, go, totals), daemon=True) for g in groups]
    done = threading.Event()
    beat = threading.Thread(target=_heartbeats, args=(cfg, streams, done), daemon=True)
    beat.start()
    for w in workers:
        w.start()
    go.wait()
    cpu0 = _cpu()
    for w in workers:
        w.join()
    done.set()
    totals.pop("lock")
    out.put(("runner_done", {**totals, "cpu": _cpu() - cpu0, "sent": {s.session_id: s.sent for s in streams},
                             "problems": [f"task {s.task_id}: {s.error}" for s in streams if s.error]}))


# followers


class _Follower:
    """One SSE reader of one session: the reply text it rebuilt, and when each token arrived."""

    def __init__(self, cfg: dict[str, Any], session_id: int) -> None:
        self.cfg = cfg
        self.session_id = session_id
        self.text: list[str] = []
        self.chars = 0
        self.received: list[float] = []  # received[i]: when token i was complete at the follower
        self.last_id: bytes | None = None
        self.reconnects = 0
        self.restarts = 0  # `state: queued` after tokens: the attempt was lost, its text starts over
        self.end_state = ""
        self.error = ""

    def _open(self) -> sse.Stream:
        headers = {"Authorization": f"Bearer {self.cfg['key']}", "Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id.decode()  # opaque: whatever the server sent as `id:`
        stream = sse.Stream(self.cfg["host"], self.cfg["port"],
                            f"/api/v1/sessions/{self.session_id}/events?follow=1", headers, self.cfg["timeout"])
        try:
            stream.open()
        except BaseException:
            stream.close()
            raise
        return stream

    def _event(self, block: bytes, now: float) -> None:
        event_id, _, raw = sse.fields(block)
        if event_id is not None:
            self.last_id = event_id
        if raw is None:
            return
        data = json.loads(raw)
        kind = data.get("kind")
        if kind == "token":
            text = data["text"]
            self.text.append(text)
            self.chars += len(text)
            whole = self.chars // TOKEN_WIDTH
            if whole > len(self.received):
                self.received.extend([now] * (whole - len(self.received)))
        elif kind == "state":
            state = data.get("state")
            if state == "queued" and self.chars:
                self.restarts += 1
                self.text, self.chars, self.received = [], 0, []
            elif state in END_STATES:
                self.end_state = state

    def open(self) -> sse.Stream | None:
        """Open (or reopen, from the last event id) the stream, non-blocking from then on; None on failure."""
        try:
            stream = self._open()
        except Exception as exc:
            self.error = repr(exc)
            return None
        now = time.monotonic()
        for block in stream.pending():
            self._event(block, now)
        stream.sock.setblocking(False)
        return stream

    def read(self, stream: sse.Stream) -> bool:
        """Take what the socket has; False when the stream is over (ended, dropped or failed)."""
        try:
            data = stream.sock.recv(262144)
        except BlockingIOError:
            return True
        except OSError as exc:
            logger.warning("session %s: stream broke: %r", self.session_id, exc)
            data = b""
        now = time.monotonic()
        for block in stream.feed(data):
            self._event(block, now)
        return bool(data) and not self.end_state and not stream.ended

    def result(self, tokens: int) -> dict[str, Any]:
        """What this follower saw, and whether its text is exactly the runner's."""
        text = "".join(self.text)
        expected = full_text(self.session_id, tokens)
        problem = self.error
        if not problem and text != expected:
            at = next((i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
                      min(len(text), len(expected)))
            problem = (f"text differs from the runner's at character {at} (got {len(text)} characters, "
                       f"expected {len(expected)}): {text[max(0, at - 10):at + 10]!r} vs "
                       f"{expected[max(0, at - 10):at + 10]!r}")
        if not problem and self.end_state != "complete":
            problem = f"the reply ended {self.end_state or 'never'}"
        return {"session_id": self.session_id, "tokens": self.chars // TOKEN_WIDTH, "received": self.received,
                "ok": not problem, "problem": problem, "reconnects": self.reconnects,
                "restarts": self.restarts, "last_received": self.received[-1] if self.received else None}


def follower_process(cfg: dict[str, Any], session_ids: list[int], out: Any) -> None:
    """One thread following every session given (a selector over their sockets); reports when every
    stream is open, then what each saw. A stream that drops resumes with Last-Event-ID."""
    followers = [_Follower(cfg, sid) for sid in session_ids]
    selector = selectors.DefaultSelector()
    for f in followers:
        stream = f.open()
        if stream is not None:
            selector.register(stream.sock, selectors.EVENT_READ, (f, stream))
    cpu0 = _cpu()
    out.put(("following", os.getpid(), len(followers)))
    deadline = time.monotonic() + cfg["deadline"]
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            f, stream = key.data
            if f.read(stream):
                continue
            selector.unregister(stream.sock)
            stream.close()
            if f.end_state:
                continue
            f.reconnects += 1
            again = f.open() if f.reconnects <= 20 else None
            if again is not None:
                selector.register(again.sock, selectors.EVENT_READ, (f, again))
            elif not f.error:
                f.error = "the stream dropped more than 20 times"
    for key in list(selector.get_map().values()):
        key.data[0].error = key.data[0].error or "still open at the deadline"
        key.data[1].close()
    selector.close()
    out.put(("follower_done", {"cpu": _cpu() - cpu0,
                               "streams": [f.result(cfg["tokens"]) for f in followers]}))
