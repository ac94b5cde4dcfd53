"""CPU per worker events post: the pydantic schema (helix_api/schemas/worker.py) against the hand-written
checks it replaced, on the same bodies in the same run, and a whole events post through the app.

    .venv/bin/python -m bench.validation [--posts 20000]

Figures are CPU microseconds per post (time.process_time) and the ratio new/old; the whole-post figure
(Flask test client, SQLite, lease check and insert included) says what share validation is of a post.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

from helix_api.schemas.base import adapter
from helix_api.schemas.worker import EventsPost

_KINDS = ("token", "progress", "log")


def _old_parse(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The checks the schema replaced (helix_api/tasks/routes.py before it): json.loads, then a loop per event."""
    body = json.loads(raw)
    if not isinstance(body, dict) or set(body) - {"lease_token", "events"}:
        raise ValueError("bad body")
    token, items = body.get("lease_token"), body.get("events")
    if not isinstance(token, str) or not isinstance(items, list) or len(items) > 1000:
        raise ValueError("bad body")
    for raw_event in items:
        if not isinstance(raw_event, dict):
            raise ValueError("bad event")
        seq, kind = raw_event.get("seq"), raw_event.get("kind")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or kind not in _KINDS:
            raise ValueError("bad event")
        if kind == "token" and not isinstance(raw_event.get("text"), str):
            raise ValueError("bad event")
        if kind == "progress":
            for key in ("step", "total"):
                value = raw_event.get(key)
                if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                    raise ValueError("bad event")
        if kind == "log" and not isinstance(raw_event.get("message"), str):
            raise ValueError("bad event")
    return token, items


def _body(events: int, first_seq: int = 1) -> bytes:
    items = [{"seq": first_seq + i, "kind": "token", "text": f" word{i}"} for i in range(events)]
    items[-1:] = [{"seq": first_seq + events - 1, "kind": "progress", "step": 3, "total": 10, "loss": 0.25}]
    return json.dumps({"lease_token": "l_" + "x" * 40, "events": items}).encode()


def _cpu_per_call(fn: Callable[[], Any], calls: int) -> float:
    fn()  # warm
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def parse_figures(calls: int) -> list[tuple[str, float, float]]:
    """(body, old µs, new µs) per parse of an events body of several sizes."""
    new = adapter(EventsPost)
    rows = []
    for events in (1, 8, 256):
        raw = _body(events)
        rows.append((f"{events} events", _cpu_per_call(lambda raw=raw: _old_parse(raw), calls),
                     _cpu_per_call(lambda raw=raw: new.validate_json(raw), calls)))
    return rows


def whole_post(posts: int) -> tuple[float, float]:
    """CPU µs per whole events post (8 events) through the app on SQLite, and the share that is the schema."""
    from helix_api.accounts.auth import create_runner_token, create_user
    from helix_api.app import create_app
    from helix_api.ops.schema_version import upgrade
    from helix_api.services import services

    data = tempfile.mkdtemp(prefix="helix-bench-validation-")
    url = f"sqlite:///{data}/helix.db"
    upgrade(url)
    app = create_app({"DATABASE_URL": url, "DATA_DIR": data, "AUTO_UPGRADE": False})
    with app.app_context():
        database = services().database
    with database.orm_write() as session:
        _, key = create_user(session, "bench")
        token = create_runner_token(session, "bench")
    client = app.test_client()
    model = "mistralai/Mistral-7B-Instruct-v0.1"
    client.post("/api/v1/sessions", headers={"Authorization": f"Bearer {key}"},
                json={"model_name": model, "message": "hi"})
    runner = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    claimed = client.get(f"/api/v1/worker/task?model_name={model}", headers=runner).json
    url_events = f"/api/v1/worker/task/{claimed['task']['id']}/events"
    lease = claimed["lease"]["token"]
    bodies = [json.dumps({"lease_token": lease, "events": json.loads(_body(8, 1 + 8 * i))["events"]}).encode()
              for i in range(posts)]
    start = time.process_time()
    for raw in bodies:
        response = client.post(url_events, data=raw, headers=runner)
        assert response.status_code == 200, response.json
    per_post = (time.process_time() - start) / posts * 1e6
    parser = adapter(EventsPost)
    schema = _cpu_per_call(lambda: parser.validate_json(bodies[0]), 2000)
    database.dispose()
    return per_post, schema


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20000, help="parses per body size")
    parser.add_argument("--posts", type=int, default=2000, help="whole events posts through the app")
    args = parser.parse_args()
    print("events body   hand-written µs   schema µs   schema/hand-written")
    for name, old, new in parse_figures(args.calls):
        print(f"{name:<13} {old:>15.2f} {new:>11.2f} {new / old:>21.2f}")
    per_post, schema = whole_post(args.posts)
    print(f"whole events post (8 events, SQLite, test client): {per_post:.0f} µs CPU; "
          f"the schema {schema:.1f} µs of it ({schema / per_post:.1%})")


if __name__ == "__main__":
    main()
